"""The work behind commands that are not generation: bench, the model inventory (llm models), convert and
the mask view (visualize-mask)."""
