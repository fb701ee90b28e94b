"""Operations: metrics, health endpoints, memory readings, background-task supervision, log summaries."""
