"""Ray at the edge: connecting, the genloop CLI, job submission, the local autoscaling simulation."""
