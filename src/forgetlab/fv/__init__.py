"""Function vectors: head activations, causal indirect effect, top heads, vectors and interventions."""

from forgetlab.fv.cie import ENGINES, causal_indirect_effect, mean_head_activations
from forgetlab.fv.evaluate import FVEvalSettings, evaluate_function_vector
from forgetlab.fv.extract import FunctionVectorResult, FVSettings, extract_function_vector
from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, counterfactuals, load_task, sample_prompts
from forgetlab.fv.vectors import cosine, function_vector, top_heads, universal_heads

__all__ = ["ENGINES", "FVEvalSettings", "FVSettings", "FunctionVectorResult", "ICLPrompt", "ICLTask", "PromptFormat",
           "causal_indirect_effect", "cosine", "counterfactuals", "evaluate_function_vector", "extract_function_vector",
           "function_vector", "load_task", "mean_head_activations", "sample_prompts", "top_heads", "universal_heads"]
