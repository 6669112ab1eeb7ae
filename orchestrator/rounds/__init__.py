"""The round loop (``loop.py``), written once, and the fleets it runs over: real agents
over MQTT (``mqtt.py``) or the agent's engine in worker processes (``workers.py``)."""
