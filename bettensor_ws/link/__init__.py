"""The Trio shell: thin pumps over the protocol layer, the validator server
and the miner client. One nursery per connection owns its reader, writer and
heartbeat tasks.
"""
