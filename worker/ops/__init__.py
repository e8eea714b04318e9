"""Operations: settings, structured logging, metrics."""
