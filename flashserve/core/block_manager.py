"""KV block allocation: a free list of fixed-size blocks and a block table per request."""

from __future__ import annotations

import collections

from flashserve.core.request import Request


class BlockManager:
    """Hands out KV cache blocks of `block_size` token slots.

    Invariant: every block id in [0, num_blocks) is either in the free list or in exactly one
    request's `block_ids`, so `num_free_blocks + sum(len(r.block_ids)) == num_blocks`.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Number of blocks that hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` still needs so that its table covers `num_tokens` slots."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_ids))

    # NOTE: can_allocate and allocate inline blocks_for: they run for every request of every step.

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) - len(request.block_ids) <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Grow `request`'s block table to cover `num_tokens` slots; blocks are only appended."""
        missing = -(-num_tokens // self.block_size) - len(request.block_ids)
        if missing <= 0:
            return
        if missing > len(self._free):
            raise RuntimeError(
                f"request {request.request_id} needs {missing} more KV blocks but only "
                f"{len(self._free)} are free; call can_allocate() first"
            )
        for _ in range(missing):
            block_id = self._free.popleft()
            self._owner[block_id] = request.request_id
            request.block_ids.append(block_id)

    def free(self, request: Request) -> None:
        """Return all of `request`'s blocks to the free list."""
        for block_id in request.block_ids:
            del self._owner[block_id]
            self._free.append(block_id)
        request.block_ids = []
        request.num_reserved_tokens = 0

    def block_owners(self) -> list[str | None]:
        """Owner request id of each block, None for a free block (for the dashboard's block map)."""
        return [self._owner.get(block_id) for block_id in range(self.num_blocks)]
