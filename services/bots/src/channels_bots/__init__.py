"""Loomio Matrix bot bridge fed by Redis chatbot/* messages"""
