"""Exact top-k search of query vectors over streamed passage blocks (torch, optionally faiss).

Used by training (mined negatives) and by evaluation; imports neither (docs/DESIGN.md, "Map").
"""
