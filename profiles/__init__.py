"""Shipped arbitration-head profiles (package data, installed as `steer_server.profiles`)."""
