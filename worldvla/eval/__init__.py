"""Evaluation: closed-loop success and world-model metrics on Meta-World (`metaworld`),
the release's LIBERO protocol (`libero`), PSNR / SSIM (`metrics`), figures (`plots`)
and the chunk-mask ablation at inference (`ablations`). Submodules import lazily:
nothing here pulls in a simulator."""
