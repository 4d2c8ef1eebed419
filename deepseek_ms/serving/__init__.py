"""Serving front ends: the engine server and its clients, MindSpore Serving, the OpenAI API."""
