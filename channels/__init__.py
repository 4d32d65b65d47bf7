"""Senders: separate processes that consume a channel topic and deliver the send requests.

The worker only decides; senders act. Each sender deduplicates by the request's idempotency key,
commits its offsets only after delivery, and reports unreachable users on the feedback topic
(which also triggers the request's fallback channel, if it names one).
"""
