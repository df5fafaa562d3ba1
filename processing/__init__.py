"""pacslab processing."""
