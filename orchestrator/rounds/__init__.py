"""The round loop (``loop.py``), written once, and the fleets it runs over: real agents
over MQTT (``mqtt.py``), the agent's engine in worker processes (``workers.py``), or every
client in one torch engine on a GPU or the CPU (``torch_fleet.py``, ``torch_engine.py``)."""
