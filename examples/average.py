def average(values: list[float]) -> float:
    """Arithmetic mean of values."""
    total = sum(values)
    return 
