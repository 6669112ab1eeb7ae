"""What a fleet runs on: the embedded MQTT broker, a secure Mosquitto setup, and local
agent processes."""
