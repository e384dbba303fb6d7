"""Loomio live record updates: a Socket.IO relay of Redis /records and /system_notice"""
