"""Loomio collaborative editing: a Hocuspocus-compatible Yjs server on pycrdt"""
