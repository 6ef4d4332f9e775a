"""Test helper: a tiny random SAM and Grounding DINO, built and saved in code (no network), for the
segmentation tests and the web UI's."""

import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "red", "ball"]


def save_tiny_sam(folder) -> None:
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             output_channels=16, image_size=64, patch_size=8, global_attn_indexes=[1],
                             window_size=4, mlp_dim=64, num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())).save_pretrained(folder)
    # The decoder's masks are 4x its 8x8 embedding: 32 px, padded to 32 like SAM's 256 of 1024.
    SamProcessor(SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                      mask_size={"longest_edge": 32}, mask_pad_size={"height": 32, "width": 32})
                 ).save_pretrained(folder)


def save_tiny_grounding_dino(folder) -> None:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
    # d_model 32: its group norms have 32 groups; two decoder layers: the box heads are tied across layers.
    config = GroundingDinoConfig(backbone_config=backbone.to_dict(), text_config=text.to_dict(), d_model=32,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
                                 max_text_len=32, encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 128}), tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
