# The library's preset 'detr3d_tiny' (a smoke test): 8 training and 4 held-out scenes seen by 4 cameras of
# 32 x 48 pixels, batches of 4, two epochs; the mini DETR3D with widths 8/8/16, d=16, 2 heads, 2 layers,
# FFN 32, 6 queries; AdamW lr 1e-3, weight decay 1e-4, clipping at 0.1, one warm-up step.
_base_ = ['./detr3d_mini.py']
embed_dims = 16
num_cams = 4
cross = dict(type='Detr3DCrossAtten', pc_range=[-25.0, -25.0, -1.0, 25.0, 25.0, 4.0], num_points=1,
             embed_dims=embed_dims, num_levels=4, num_cams=num_cams, dropout=0.0)
model = dict(
    img_backbone=dict(widths=(8, 8, 16), strides=(2, 2, 2)),
    img_neck=dict(in_channels=[8, 8, 16], out_channels=embed_dims),
    pts_bbox_head=dict(
        num_query=6,
        in_channels=embed_dims,
        transformer=dict(num_cams=num_cams, decoder=dict(num_layers=2, transformerlayers=dict(
            attn_cfgs=[dict(type='MultiheadAttention', embed_dims=embed_dims, num_heads=2, dropout=0.0), cross],
            feedforward_channels=32)))))
world = dict(num_cams=num_cams, image_hw=(32, 48))
train_dataloader = dict(dataset=dict(num_scenes=8, **world))
val_dataloader = dict(dataset=dict(num_scenes=4, **world))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=1e-4), clip_grad=dict(max_norm=0.1))
max_epochs = 2
warmup_iters = 1
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / warmup_iters, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[], gamma=0.1)  # lr_drop 200 > 2 epochs
]
default_hooks = dict(logger=dict(interval=1))
