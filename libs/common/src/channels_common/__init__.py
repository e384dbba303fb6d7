"""Pieces shared by the records, collab and bots services."""
