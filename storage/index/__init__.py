"""pacslab storage/index."""
