"""pacslab worklist."""
