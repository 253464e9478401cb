"""Running the process: drain and shutdown, listeners, SIGHUP reload, --workers, process-wide
tuning."""
