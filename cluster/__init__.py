"""The edge: every ``genloop`` command (``cluster/commands/``, one module per verb; ``cluster/cli.py`` dispatches),
connecting to Ray (``runtime.py``), Ray job submission (``jobs.py``), the local autoscaling proof (``autoscale.py``)
and the demo driver with its quiet console and summary (``demo.py``, ``console.py``, ``demo_summary.py``). Nothing
below this package imports it."""
