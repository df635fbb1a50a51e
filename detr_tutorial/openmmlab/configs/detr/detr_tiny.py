# The library's preset 'tiny' (a smoke test): 16 training and 8 held-out images of 32 x 32 pixels,
# batches of 8, two epochs; DETR with d=16, 2 heads, 1 + 2 layers, FFN 32, 6 queries.
_base_ = ['./detr_shapes_cpu.py']
embed_dims = 16
attn = dict(embed_dims=embed_dims, num_heads=2)  # merged into the base's attn and layer settings
ffn = dict(embed_dims=embed_dims, feedforward_channels=32)
model = dict(
    num_queries=6,
    backbone=dict(widths=(8, 8, 16)),
    neck=dict(in_channels=[16], out_channels=embed_dims),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=attn, ffn_cfg=ffn)),
    decoder=dict(num_layers=2, layer_cfg=dict(self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=ffn)),
    positional_encoding=dict(num_feats=embed_dims // 2),
    bbox_head=dict(embed_dims=embed_dims))
train_dataloader = dict(batch_size=8, dataset=dict(num_images=16, image_size=32))
val_dataloader = dict(dataset=dict(num_images=8, image_size=32))
test_dataloader = val_dataloader
max_epochs = 2
warmup_iters = 2
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / warmup_iters, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[], gamma=0.1)  # lr_drop 200 > 2 epochs
]
default_hooks = dict(logger=dict(interval=1))
