"""The sans-IO protocol: messages, codec, signing, auth, replay guard, rate
budget, dispatch table, refusals and the per-link protocol object.

Nothing here imports trio or opens a socket; time is always passed in.
"""
