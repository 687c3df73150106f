"""Outcome resolution: realized closes from the market, pure rewards from rewards/, rows into store/."""
