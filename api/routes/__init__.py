"""pacslab api/routes."""
