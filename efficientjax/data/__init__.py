"""Corpora, tokenizers, chat templates, instruction-tuning examples and packing into
deterministic, resumable, per-process batches."""

from efficientjax.data.chat import encode_chat
from efficientjax.data.chat import render_chat
from efficientjax.data.corpora import CORPORA
from efficientjax.data.corpora import Document
from efficientjax.data.corpora import load_documents
from efficientjax.data.instructions import build_instruction_data
from efficientjax.data.instructions import encode_example
from efficientjax.data.instructions import Example
from efficientjax.data.instructions import load_examples
from efficientjax.data.instructions import pack_examples
from efficientjax.data.instructions import PackedExamples
from efficientjax.data.pipeline import build_data
from efficientjax.data.pipeline import Data
from efficientjax.data.pipeline import is_held_out
from efficientjax.data.pipeline import split_documents
from efficientjax.data.pipeline import TrainStream
from efficientjax.data.tokenizers import ByteTokenizer
from efficientjax.data.tokenizers import CheckpointTokenizer
from efficientjax.data.tokenizers import GenerationIds
from efficientjax.data.tokenizers import get_tokenizer
from efficientjax.data.tokenizers import HFTokenizer
from efficientjax.data.tokenizers import Tokenizer

__all__ = [
    'CORPORA',
    'Document',
    'load_documents',
    'build_instruction_data',
    'encode_example',
    'Example',
    'load_examples',
    'pack_examples',
    'PackedExamples',
    'build_data',
    'Data',
    'is_held_out',
    'split_documents',
    'TrainStream',
    'ByteTokenizer',
    'CheckpointTokenizer',
    'encode_chat',
    'render_chat',
    'GenerationIds',
    'get_tokenizer',
    'HFTokenizer',
    'Tokenizer',
]
