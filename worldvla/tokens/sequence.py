"""Training and prompt sequences in the release's conversation template (spec section 2).

    <s>{human}<sep>{assistant}<sep>

Labels are -100 over BOS and the human turn (its trailing separator included) and
equal the ids over the assistant turn. Media tokens replace the placeholders in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .actions import ActionTokenizer
from .layout import VocabLayout

IGNORE = -100
ACTION_PROMPT = "What action should the robot take to {instruction}?"
WORLD_PROMPT = "Generate the next image based on the provided sequence of historical images and corresponding actions."


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor     # [L] int64, -100 = no loss
    kind: str                # "action" | "world"


def image_tokens(codes: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """codes [h, w] -> [BOI, res(H/32), res(W/32), row_0, NL, ..., row_{h-1}, NL, EOI]."""
    codes = torch.as_tensor(codes)  # codes kept as an array
    if codes.dim() != 2:
        raise ValueError(f"image codes must be a [h, w] grid, got shape {tuple(codes.shape)}")
    h, w = codes.shape
    per_grid = layout.res_grid // layout.patch
    if h % per_grid or w % per_grid:
        raise ValueError(
            f"a {h}x{w} code grid is not a whole number of {layout.res_grid}-px resolution grids "
            f"(image sides must be multiples of {layout.res_grid} px)")
    ids = layout.code_to_id(codes)
    rows = torch.cat([ids, torch.full((h, 1), layout.newline, dtype=torch.long)], dim=1).flatten()
    head = torch.tensor([layout.boi, layout.res_token(h // per_grid), layout.res_token(w // per_grid)])
    return torch.cat([head, rows, torch.tensor([layout.eoi])])


def codes_from_image_tokens(ids: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """Inverse of `image_tokens` -> codes [h, w]."""
    from ..ops.dispatch import require_integers  # here: the ops package imports the tokens package

    ids = torch.as_tensor(ids)
    require_integers(ids, "image token ids must be integers")  # not truncated to other ids
    ids = ids.long().flatten()
    if ids.numel() < 4 or int(ids[0]) != layout.boi or int(ids[-1]) != layout.eoi:
        raise ValueError("an image token list must start with BOI and end with EOI")
    lo, hi = layout.res_base, layout.res_base + layout.n_res
    if not (lo <= int(ids[1]) <= hi and lo <= int(ids[2]) <= hi):
        # another token there would be read as a negative or oversized grid count
        raise ValueError(f"an image token list must give its height and width as resolution tokens (ids {lo}..{hi}) "
                         f"after BOI, got ids {int(ids[1])} and {int(ids[2])}")
    per_grid = layout.res_grid // layout.patch
    h = (int(ids[1]) - layout.res_base) * per_grid
    w = (int(ids[2]) - layout.res_base) * per_grid
    body = ids[3:-1]
    if body.numel() != h * (w + 1):
        raise ValueError(f"image body has {body.numel()} tokens, expected {h} rows of {w} codes + newline")
    grid = body.view(h, w + 1)
    if bool((grid[:, -1] != layout.newline).any()):
        raise ValueError("image rows must each end with the newline token")
    return layout.id_to_code(grid[:, :-1])


class SequenceBuilder:
    def __init__(self, layout: VocabLayout, text_tokenizer, action_tokenizer: ActionTokenizer):
        self.layout = layout
        self.text = text_tokenizer
        self.actions = action_tokenizer

    def _turn(self, parts) -> torch.Tensor:
        return torch.cat([torch.as_tensor(p, dtype=torch.long).flatten() for p in parts]
                         + [torch.tensor([self.layout.sep])])

    def action_prompt(self, instruction: str, history_codes: list[torch.Tensor]) -> torch.Tensor:
        """BOS + human turn (instruction, history images), ending with the separator. `history_codes`: a list of
        [h, w] code grids, or one [N, h, w] tensor of N grids."""
        if not isinstance(instruction, str):  # None would be written into the prompt as the word "None"
            raise TypeError(f"the instruction must be text (str), got {type(instruction).__name__}")
        if isinstance(history_codes, torch.Tensor):
            if history_codes.dim() != 3:
                raise ValueError(f"history images must be a list of [h, w] code grids (or one [N, h, w] tensor), got "
                                 f"a tensor of shape {tuple(history_codes.shape)}; for one image pass [codes]")
            history_codes = list(history_codes)
        if not history_codes:
            raise ValueError("an action prompt needs at least one image")
        text = self.text.encode(ACTION_PROMPT.format(instruction=instruction))
        human = self._turn([text] + [image_tokens(c, self.layout) for c in history_codes])
        return torch.cat([torch.tensor([self.layout.bos]), human])

    def world_prompt(self, codes: torch.Tensor, action) -> torch.Tensor:
        """BOS + human turn (the world-model text, the image, ONE action [D]), ending with the separator."""
        block = self.actions.encode(action)
        if block.dim() != 1:  # [K, D] would make a K-action prompt the world model never saw (spec 2.3: "1a2i")
            D = self.actions.action_dim
            raise ValueError(f"a world-model prompt holds one action [{D}], got shape {tuple(block.shape[:-1]) + (D,)}"
                             f"; for a sequence of actions, step the world model once per action")
        text = self.text.encode(WORLD_PROMPT)
        human = self._turn([text, image_tokens(codes, self.layout), block])
        return torch.cat([torch.tensor([self.layout.bos]), human])

    @staticmethod
    def _with_labels(prompt: torch.Tensor, answer: torch.Tensor, kind: str) -> Sample:
        ids = torch.cat([prompt, answer])
        labels = torch.cat([torch.full_like(prompt, IGNORE), answer])
        return Sample(ids, labels, kind)

    def action_sample(self, instruction: str, history_codes: list[torch.Tensor], actions) -> Sample:
        """History images (1 or 2) and a chunk of K actions [K, D] (spec 2.2)."""
        chunk = self.actions.encode(actions)
        if chunk.dim() != 2:
            raise ValueError(f"an action chunk must be [K, D], got shape {tuple(chunk.shape)}")
        if chunk.shape[0] == 0:
            raise ValueError("an action chunk must hold at least one action (K >= 1), got an empty [0, D] chunk: "
                             "the answer would be the separator alone; pass the K actions that follow the images")
        answer = self._turn([chunk.flatten()])
        return self._with_labels(self.action_prompt(instruction, history_codes), answer, "action")

    def world_sample(self, codes: torch.Tensor, action, next_codes: torch.Tensor) -> Sample:
        """(image, action) -> next image (spec 2.3)."""
        answer = self._turn([image_tokens(next_codes, self.layout)])
        return self._with_labels(self.world_prompt(codes, action), answer, "world")
