"""The miniature experiment: procedural sample data and the plain-vs-aligned demo."""
