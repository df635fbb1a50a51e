# Chapter 15's DAB-DETR on the shapes data at DETR's sizes (MMDetection 3.x:
# configs/dab_detr/dab-detr_r50_8xb2-50e_coco.py): PReLU feed-forward layers, image positions with
# temperature 20, class loss weight 1 (matching cost 2), top-300 detections.
_base_ = ['../conditional_detr/conditional-detr_shapes_cpu.py']
embed_dims = 64
attn = dict(embed_dims=embed_dims, num_heads=4, dropout=0.0)
ffn = dict(embed_dims=embed_dims, feedforward_channels=128, ffn_drop=0.0, act_cfg=dict(type='PReLU'))
model = dict(
    type='DABDETR',
    encoder=dict(layer_cfg=dict(self_attn_cfg=attn, ffn_cfg=ffn)),
    decoder=dict(layer_cfg=dict(self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=ffn)),
    positional_encoding=dict(temperature=20),
    bbox_head=dict(type='DABDETRHead', loss_cls=dict(loss_weight=1.0)),
    test_cfg=dict(max_per_img=300))
