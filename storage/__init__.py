"""pacslab storage."""
