"""First-order training on the workstation: data sets and partitions, the model zoo,
FedAvg/FedAdam, and evaluation."""
