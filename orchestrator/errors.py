"""Kept for imports written before the errors moved to tasks/errors.py (the lower layer)."""

from tasks.errors import ShardFailed, StageFailed, UserError

__all__ = ["ShardFailed", "StageFailed", "UserError"]
