"""A deterministic text corpus for tokenizer parity: hand-picked hard cases (punctuation, accents, CJK, emoji,
numbers, case, whitespace, HTML entities, special-token text, very long text), the zero-shot prompts a LiT user
writes (ImageNet class names in CLIP-style templates), and seeded random mixes of all of these."""

import random

from mlx_aim.data import imagenet_classes

HAND_PICKED = [
    "", " ", "   ", "\t", "\n", "\r\n", " \t\n ",
    "a photo of a cat", "a photo of a dog", "A PHOTO OF A CAT", "A Photo Of A Cat", "a photo of a cat.",
    "  leading spaces", "trailing spaces   ", "  both  ", "multiple   spaces   between   words",
    "tabs\tbetween\twords", "new\nlines\nhere", "windows\r\nline\r\nends", "mixed \t\n\r\n whitespace",
    "non\u00a0breaking\u00a0space", "em\u2003space and\u2009thin space", "ideographic\u3000space",
    "zero\u200bwidth\u200bspace", "word\u2028line separator", "vertical\x0btab\x0cform feed",
    "Hello, world!", "What?!", "Wait... what???", "(parentheses) [brackets] {braces} <angles>",
    "semi;colon:colon", "quote \"double\" 'single'", "back`tick`", "a-b_c/d\\e|f", "~!@#$%^&*()_+-=",
    "email@example.com", "https://example.com/path?query=1&x=2#frag", "#hashtag @mention", "C++ and C#",
    "don't can't won't it's I'm you're we've they'll he'd", "DON'T CAN'T IT'S I'M YOU'RE", "rock 'n' roll",
    "the dog's bone", "the dogs' bones", "o'clock", "'quoted'", "''double single''", "it’s curly", "“smart quotes”",
    "café", "naïve résumé", "Über große Straße", "niño señor mañana", "ça va? où est l'hôtel", "Ærø Øresund Åland",
    "crème brûlée", "e\u0301 composed by combining accent", "n\u0303 and a\u0308", "ﬁ ligature ﬂ", "Ǆ ǅ ǆ",
    "İstanbul ıı", "ΑΒΓ αβγ Ελληνικά", "Привет, мир", "Здравствуйте", "مرحبا بالعالم", "שלום עולם",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "안녕하세요 세계", "こんにちは世界", "カタカナ ひらがな 漢字", "你好，世界",
    "一只猫的照片", "東京タワー", "中文。标点！符号？", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３", "ﾊﾝｶｸ", "㈱ ㍻ ℃ №",
    "😀", "😀😃😄", "a photo of a 🐱", "👍🏽 thumbs", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "❤️ heart", "☃ ★ ♠ ♥",
    "1", "42", "3.14159", "1,000,000", "1e10", "0x1F", "2024-11-21", "12:30pm", "$9.99", "€100", "50%", "#1",
    "1st 2nd 3rd 4th", "٣ Arabic-Indic digit", "Ⅻ roman", "½ ¼ ¾", "²³", "1234567890" * 3,
    "MiXeD CaSe WoRdS", "camelCaseWord", "snake_case_word", "ALLCAPS", "iPhone", "McDonald's", "O'Neil",
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "Tom &amp; Jerry", "&quot;quoted&quot;", "&#39;apos&#39;", "&nbsp;",
    "&amp;amp;", "AT&T", "<b>html</b>", "<p>paragraph</p>",
    "<|startoftext|>", "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|>a photo", "<|ENDOFTEXT|>",
    "<|StartOfText|>", "<|startoftext|><|endoftext|>", "< |endoftext| >", "<|endof text|>",
    "\x00null\x00", "bell\x07", "del\x7f", "\ufeffbom", "\ufffd replacement", "soft\u00adhyphen",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis", "aaaaaaaaaaaaaaaaaaaa",
    "abababababababababababab", "zzzzzzzz", "qwxz jjjj", "x" * 200, "ab" * 150, ".....", "!!!!!!!!", "?!?!?!",
    "---", "___", "***", "     .     ", "a" + " " * 100 + "b",
]

TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a close-up photo of the {}.",
    "a black and white photo of the {}.",
    "a pixelated photo of the {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a drawing of a {}.", "a photo of the large {}.", "a photo of a nice {}.", "a photo of the weird {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a plastic {}.", "itap of a {}.",
    "a origami {}.", "a low resolution photo of the {}.", "a toy {}.", "the {} in a video game.",
    "a {} in a video game.",
]

PIECES = [
    "photo", "Photo", "CAT", "dog", "the", "of", "a", "é", "ü", "ñ", "ß", "Ø", "猫", "写真", "犬", "한국어", "😀", "🐶",
    "👍🏽", "123", "4", "3.5", "!", "?", ",", ".", "'s", "'T", "'re", "'LL", "&amp;", "&lt;", "-", "_", "/", "(", ")",
    "\"", "'", "’", "…", "—", "<|endoftext|>", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "e\u0301", "ﬁ", "ｆｕｌｌ",
    "Ελλάδα", "Москва", "عربي", "हिन्दी", "ไทย", "#", "@", "$", "%", "^", "*", "~", "|", "\\", "+", "=",
]


def prompts() -> list[str]:
    """Every ImageNet class in one template, cycling through the templates."""
    return [TEMPLATES[i % len(TEMPLATES)].format(name) for i, name in enumerate(imagenet_classes())]


def random_mixes(count: int, seed: int = 14) -> list[str]:
    """`count` strings of 1 to 40 pieces drawn with a seeded generator, joined with or without spaces."""
    rng = random.Random(seed)
    mixes = []
    for _ in range(count):
        pieces = rng.choices(PIECES, k=rng.randint(1, 40))
        mixes.append(rng.choice(["", " "]).join(pieces))
    return mixes


def long_texts() -> list[str]:
    """Texts far past 77 tokens: prose, one endless word, digits (one token each), emoji (several tokens each),
    and text whose cut falls exactly at the limit."""
    prose = ("The quick brown fox jumps over the lazy dog while a photo of a cat sits on the table. " * 20).strip()
    return [prose, "x" * 5000, "1" * 500, "😀" * 300, "猫" * 300, " ".join(["word"] * 75), " ".join(["word"] * 76),
            " ".join(["word"] * 77), " ".join(["word"] * 74), "a, " * 100, "Ünïcödé " * 60]


def corpus() -> list[str]:
    """The whole corpus, in a fixed order."""
    return [*HAND_PICKED, *prompts(), *random_mixes(400), *long_texts()]
