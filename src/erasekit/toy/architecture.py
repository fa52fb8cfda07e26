"""The sizes of the embedded world's models: one place, read by training, loading and tests.

Chosen for the 2-core CPU bar (>= 4 images/s at batch 32, 20 DDIM steps, CFG on): 64x64 images,
a factor-4 AutoencoderKL (16x16x4 latents) and a UNet whose 16x16 level has no attention (self-attention
there dominated CPU time); cross-attention works at 8x8 and 4x4, where shape, colour and texture are decided.
"""

IMAGE_SIZE = 64
LATENT_SIZE = 16
MAX_TOKENS = 24  # prompts are padded/truncated to this many MiniLM tokens
TEXT_DIM = 384

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,  # diffusers reads this as the number of heads
    norm_num_groups=16,
)

# Stable Diffusion's own noise schedule, so that methods tuned on SD see familiar timesteps.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
