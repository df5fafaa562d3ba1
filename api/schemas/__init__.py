"""pacslab api/schemas."""
