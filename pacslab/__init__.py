"""pacslab pacslab."""
