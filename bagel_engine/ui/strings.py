"""The web UI's words in each language (``bagel serve --lang zh``, ``bagel ui --lang zh``): the English text is
the key, so the code reads as it shows in English; ``Words(lang)("Prompt")`` gives the translation. Knob names
(``cfg_text_scale`` ...) stay as they are in every language: they are what the API, the CLI and the docs call
them. Our own wording."""

from __future__ import annotations

LANGS = ("en", "zh")

ZH: dict[str, str] = {
    # the header and the tabs
    "# BAGEL\nModel: `{name}` · images up to {max_side}px per side, in steps of {step}px":
        "# BAGEL\n模型：`{name}` · 图片每边最多 {max_side} 像素，以 {step} 像素为步长",
    "Text to image": "文字生成图片",
    "Edit": "编辑图片",
    "Understand": "看图回答",
    "Chat": "对话",
    # text to image
    "Prompt": "描述",
    "A red fox in the snow, watercolor": "雪地里的一只红狐狸，水彩画",
    "Width": "宽度",
    "Height": "高度",
    "Think first (show the plan)": "先思考（显示构思）",
    "Think first": "先思考",
    "Generate": "生成",
    "Result": "结果",
    "Think text": "思考内容",
    "Seed and time": "随机种子与用时",
    # edit
    "Input images (one or several; the result takes the last one's size)": "输入图片（一张或多张；结果采用最后一张的尺寸）",
    "Instruction": "编辑指令",
    "Make it night time": "把它变成夜晚",
    # understand
    "Images (optional)": "图片（可选）",
    "Question": "问题",
    "What is in this picture?": "这张图片里有什么？",
    "Ask": "提问",
    "Answer": "回答",
    "Max new tokens": "最多生成的词元数",
    # chat
    "Conversation": "对话记录",
    "Message (attach images with the clip)": "输入消息（可用回形针附上图片）",
    "New conversation": "新对话",
    "Think": "思考",
    # the settings
    "Image generation settings": "图片生成设置",
    "CFG text scale": "文字引导强度（CFG text scale）",
    "cfg_text_scale: how strongly the prompt guides the image": "cfg_text_scale：描述对图片的引导有多强",
    "CFG image scale": "图片引导强度（CFG image scale）",
    "cfg_img_scale: how closely the input image(s) are kept": "cfg_img_scale：输入图片保留得有多紧",
    "CFG interval start": "引导区间起点（CFG interval）",
    "cfg_interval[0]: guidance applies from this point of the schedule": "cfg_interval[0]：从去噪进程的这一点开始引导",
    "CFG interval end": "引导区间终点",
    "cfg_interval[1]": "cfg_interval[1]",
    "CFG renorm type": "引导重归一化方式（CFG renorm type）",
    "cfg_renorm_type (text_channel suits edits)": "cfg_renorm_type（编辑适合 text_channel）",
    "CFG renorm min": "重归一化下限（CFG renorm min）",
    "cfg_renorm_min: 1.0 disables renorm": "cfg_renorm_min：1.0 表示不做重归一化",
    "Timestep shift": "时间步偏移（timestep shift）",
    "timestep_shift: higher spends more steps on layout": "timestep_shift：越大，越多步数用在构图上",
    "Timesteps": "时间步数（timesteps）",
    "num_timesteps: schedule points (N points, N-1 denoising steps)": "num_timesteps：时间表的点数（N 个点，N-1 步去噪）",
    "Text decoding settings": "文字生成设置",
    "Think tokens (max_think_token_n)": "思考的最多词元数（max_think_token_n）",
    "Sample (do_sample)": "随机采样（do_sample）",
    "off: greedy decoding": "关闭：每次取最可能的词",
    "Temperature (text_temperature)": "温度（text_temperature）",
    "Seed (-1: random)": "随机种子（-1：随机）",
    # progress and messages
    "waiting for the model": "等待模型空闲",
    "denoising": "去噪中",
    "answering": "回答中",
    "answering...": "回答中……",
    "denoising... (preview {n}: the picture the current step predicts)": "去噪中……（预览 {n}：当前这一步预测的图片）",
    "seed {seed}": "种子 {seed}",
    "The model is busy ({reason}).": "模型正忙（{reason}）。",
    "cancelled ({reason})": "已取消（{reason}）",
    "Write a prompt first.": "请先写下描述。",
    "Add one or more input images first.": "请先添加一张或多张输入图片。",
    "Write an instruction first.": "请先写下编辑指令。",
    "Ask a question first.": "请先提出问题。",
    "Write a message first.": "请先输入消息。",
    "CFG interval: start {lo} is above end {hi}": "引导区间：起点 {lo} 大于终点 {hi}",
    "{n} images is above the limit of {limit}": "{n} 张图片超过了 {limit} 张的上限",
}

TABLES = {"en": {}, "zh": ZH}


class Words:
    """``words("Prompt")`` in the UI's language (English when there is no translation, and the miss is kept in
    ``missing`` for the test that every word shown has one); keywords fill the text's ``{fields}``."""

    def __init__(self, lang: str = "en"):
        if lang not in TABLES:
            raise ValueError(f"unknown UI language {lang!r}; choose one of {', '.join(LANGS)}")
        self.lang, self.table = lang, TABLES[lang]
        self.missing: set[str] = set()

    def __call__(self, text: str, **fields) -> str:
        out = text
        if self.lang != "en":
            out = self.table.get(text)
            if out is None:
                self.missing.add(text)
                out = text
        return out.format(**fields) if fields else out
