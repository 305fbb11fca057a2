"""The student and its saved form: the projection, the student + projection model, the run folder's files.

Imports nothing from the other rooms of ``distill`` (docs/DESIGN.md, "Map").
"""
