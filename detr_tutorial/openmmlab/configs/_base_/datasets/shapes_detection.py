# The book's synthetic shapes (detr_tutorial.data), chapter 10's split: 4000 training images (seed 0),
# 500 held-out ones (seed 1), 64 x 64 pixels, 1 to 4 objects of 3 classes.
dataset_type = 'ShapesDataset'
shapes_data = dict(image_size=64, max_objects=4, object_size=(0.15, 0.5))

train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    drop_last=True,
    sampler=dict(type='RandomSampler', skip_draws=1),  # the engine's shuffle (and TrainRNGHook)
    collate_fn=dict(type='detr_tutorial.detr_collate'),
    dataset=dict(type=dataset_type, num_images=4000, seed=0, **shapes_data))
val_dataloader = dict(
    batch_size=100,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='detr_tutorial.detr_collate'),
    dataset=dict(type=dataset_type, num_images=500, seed=1, **shapes_data))
test_dataloader = val_dataloader

val_evaluator = dict(type='CocoAPMetric')
test_evaluator = val_evaluator
