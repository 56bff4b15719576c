"""Pure converters between `Detections` and external formats. No file or network I/O here."""
