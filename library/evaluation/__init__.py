"""eval_pfg.py's pieces and the metric training validation shares: settings and metrics."""
