"""Recipes shipped inside the package (so they work from any install); configs/ holds the rest."""
