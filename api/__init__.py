"""pacslab api."""
