"""The Metal language as the emulator checks it (see `check_metal_language`).

g++ compiles a superset of what the Metal compiler accepts: the C and C++
standard libraries, double, recursion. Two nets catch what would not compile
on a Mac: a deny-list of constructs with a specific message each, and beneath
it an allow-list of names: every function called and every type named in a
kernel must be defined in the kernel itself (its header or source), be a
template parameter, an input, output or thread attribute of the kernel, or
belong to the Metal Standard Library or to the prelude MLX puts before every
custom kernel (mlx/backend/metal/kernels/utils.h and the files it includes).
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product


class MetalLanguageError(ValueError):
    """The kernel uses something the Metal compiler would reject."""


COMMENT_OR_STRING = re.compile(
    r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])+'", re.DOTALL
)


def blank_comments(code: str) -> str:
    """Comments blanked, newlines kept."""
    return COMMENT_OR_STRING.sub(
        lambda match: (
            match.group(0) if match.group(0)[0] in "\"'" else "\n" * match.group(0).count("\n")
        ),
        code,
    )


def without_comments(code: str) -> str:
    """Comments blanked (newlines kept) and string and character literals emptied."""

    def blank(match: re.Match[str]) -> str:
        text = match.group(0)
        if text[0] in "\"'":
            return text[0] * 2
        return "\n" * text.count("\n")

    return COMMENT_OR_STRING.sub(blank, code)


# --- the deny-list: constructs with a message of their own ----------------------

_NOT_METAL = (
    (re.compile(r"\bstd\s*::"), "the C++ standard library (std::) does not exist in Metal"),
    (re.compile(r"\bdouble\b"), "Metal has no double"),
    (
        re.compile(
            r"\b(printf|fprintf|sprintf|snprintf|puts|malloc|calloc|realloc|free|abort|exit|assert"
            r"|memcpy|memset|memmove|strlen|rand|srand)\s*\("
        ),
        "C library functions do not exist in Metal",
    ),
    (
        re.compile(r"\b(erfc?|expm1|lgamma|tgamma|cbrt|remainder|remquo|nan)\s*\("),
        "not a function of the Metal standard library",
    ),
    (
        re.compile(
            r"\b(exp|exp2|expm1|log|log2|log10|log1p|pow|sqrt|sin|cos|tan|asin|acos|atan|atan2|sinh"
            r"|cosh|tanh|floor|ceil|round|trunc|fabs|fmod|fmax|fmin|fma|erf|erfc|lgamma|tgamma|cbrt"
            r"|hypot|ldexp|frexp|modf|copysign|nearbyint|rint|lround|llround)[fl]\s*\("
        ),
        "C's suffixed math functions do not exist in Metal (its functions are overloaded)",
    ),
    (
        re.compile(
            r"\b(new|delete|throw|try|catch|goto|virtual|dynamic_cast|typeid|thread_local)\b"
        ),
        "a C++ feature Metal does not have",
    ),
)
_STATIC_LOCAL = re.compile(r"\bstatic\b(?!\s+(constexpr|constant|inline)\b)")
_POINTER_DECLARATION = re.compile(
    r"\b(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool"
    r"|u?int(?:8|16|32|64)_t|float16_t|bfloat16_t)[234]?\s*\*\s*(?:const\s+)?[A-Za-z_]\w*\s*[=;,)\[]"
)
_ADDRESS_SPACE = re.compile(r"\b(device|constant|threadgroup|thread|object_data|ray_data)\b")
_FUNCTION_DEFINITION = re.compile(r"\b([A-Za-z_]\w*)\s*\([^;{}]*\)\s*(?:const\s*)?\{")
_CONTROL_KEYWORDS = {"if", "for", "while", "switch", "catch", "return", "sizeof", "defined"}
_THREADGROUP_QUALIFIER = re.compile(r"\bthreadgroup\b")
_DECLARATOR_END = re.compile(r"[;,=){]")
_ARRAY_EXTENT = re.compile(r"\[[^\]]*\]")

Problem = tuple[int, str, str]  # (offset in the code, rule, the offending text)


def check_metal_language(
    name: str, header: str, source: str, known_names: Iterable[str] = ()
) -> None:
    """Raises `MetalLanguageError` for what the Metal compiler rejects but
    g++ would accept, naming the kernel, the rule, the line and the text.

    `known_names` are the kernel's template parameters, inputs, outputs and
    thread attributes, which its source uses without defining them.
    """
    parts = {"header": without_comments(header), "source": without_comments(source)}
    for part, code in parts.items():
        _raise_first(name, part, code, _denied_constructs(part, code))
    defined = set(known_names)
    for code in parts.values():
        defined |= _defined_names(code)
    for part, code in parts.items():
        _raise_first(name, part, code, _unknown_names(code, defined))


def _raise_first(name: str, part: str, code: str, problems: list[Problem]) -> None:
    if problems:
        offset, rule, text = min(problems)
        line = code.count("\n", 0, offset) + 1
        raise MetalLanguageError(f"[metal_kernel emulator] {name}:{part}:{line}: {rule}: `{text}`")


def _denied_constructs(part: str, code: str) -> list[Problem]:
    problems = [
        (match.start(), rule, match.group(0).strip())
        for pattern, rule in _NOT_METAL
        for match in pattern.finditer(code)
    ]
    problems += _unqualified_pointers(code) + _threadgroup_initializers(code)
    if part == "source":
        rule = "static local variables do not exist in Metal"
        problems += [
            (match.start(), rule, match.group(0)) for match in _STATIC_LOCAL.finditer(code)
        ]
    else:
        problems += _recursive_functions(code)
    return problems


def _unqualified_pointers(code: str) -> list[Problem]:
    rule = "a Metal pointer needs an address space (device, constant, threadgroup, thread)"
    problems = []
    for match in _POINTER_DECLARATION.finditer(code):
        statement_start = max(code.rfind(c, 0, match.start()) for c in ";{}(,\n")
        if not _ADDRESS_SPACE.search(code, statement_start + 1, match.start()):
            problems.append((match.start(), rule, match.group(0).strip()))
    return problems


def _threadgroup_initializers(code: str) -> list[Problem]:
    problems = []
    for match in _THREADGROUP_QUALIFIER.finditer(code):
        declarator, end = declarator_after(code, match)
        if not is_pointer_or_reference(declarator) and end in ("=", "{"):
            problems.append(
                (match.start(), "threadgroup variables cannot have initializers", "threadgroup")
            )
    return problems


def _recursive_functions(code: str) -> list[Problem]:
    problems = []
    for match in _FUNCTION_DEFINITION.finditer(code):
        name = match.group(1)
        if name in _CONTROL_KEYWORDS:
            continue
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(code)):
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            if depth == 0:
                break
        if re.search(rf"\b{name}\s*\(", code[match.end() : end]):
            rule = f"recursion (`{name}` calls itself) is not allowed in Metal"
            problems.append((match.start(), rule, match.group(0).strip()))
    return problems


def declarator_after(code: str, qualifier: re.Match[str]) -> tuple[str, str]:
    """The declarator after a qualifier (array extents removed), and the
    character that ends it."""
    rest = code[qualifier.end() :]
    end = _DECLARATOR_END.search(rest)
    text = _ARRAY_EXTENT.sub("", rest[: end.start() if end else len(rest)])
    return text, end.group(0) if end else ""


def is_pointer_or_reference(declarator: str) -> bool:
    return "*" in declarator or "&" in declarator


# --- the allow-list: names a kernel may use without defining them ---------------


def _vector_types(scalars: str, sizes: str = "234") -> set[str]:
    return {
        f"{prefix}{scalar}{n}"
        for prefix in ("", "packed_")
        for scalar in scalars.split()
        for n in sizes
    }


# The Metal Standard Library (Metal Shading Language Specification, chapters 2
# and 6), without textures, samplers, ray tracing, imageblocks and the
# vertex/fragment functions (see _UNSUPPORTED_FEATURES in metal_kernel.py).
_METAL_SCALAR_TYPES = (
    "bool char uchar short ushort int uint long ulong half float bfloat size_t ptrdiff_t void"
    " int8_t uint8_t int16_t uint16_t int32_t uint32_t int64_t uint64_t"
)
METAL_TYPES = (
    set(_METAL_SCALAR_TYPES.split())
    | _vector_types("bool char uchar short ushort int uint long ulong half float bfloat")
    | {f"{t}{n}x{m}" for t, n, m in product(("float", "half", "bfloat"), "234", "234")}
    | {"vec", "packed_vec", "matrix", "atomic", "atomic_int", "atomic_uint", "atomic_bool"}
    | {"atomic_float", "atomic_ulong", "memory_order", "memory_scope", "thread_scope", "mem_flags"}
    | {"simdgroup_matrix", "simdgroup_float8x8", "simdgroup_half8x8", "simdgroup_bfloat8x8"}
    | {"simd_vote", "quad_vote", "numeric_limits", "array", "array_ref"}
    | set(
        "is_same is_same_v enable_if enable_if_t conditional conditional_t integral_constant"
        " true_type false_type is_integral is_integral_v is_floating_point is_floating_point_v"
        " is_arithmetic is_arithmetic_v is_signed is_signed_v is_unsigned is_unsigned_v"
        " is_scalar is_scalar_v is_vector is_vector_v is_convertible is_convertible_v"
        " make_signed make_signed_t make_unsigned make_unsigned_t remove_cv remove_cv_t"
        " remove_const remove_const_t remove_volatile remove_volatile_t remove_reference"
        " remove_reference_t remove_address_space remove_address_space_t vec_elements"
        " is_void is_void_v is_pointer is_pointer_v decay decay_t".split()
    )
)
METAL_FUNCTIONS = set(
    # math (6.5), common (6.4), relational (6.6), geometric (6.7), matrix (6.8)
    "abs acos acosh asin asinh atan atan2 atanh ceil copysign cos cosh cospi divide exp exp2"
    " exp10 fabs fdim floor fma fmax fmax3 fmedian3 fmin fmin3 fmod fract frexp ilogb ldexp"
    " log log2 log10 max max3 median3 min min3 modf nextafter pow powr rint round rsqrt sin"
    " sincos sinh sinpi sqrt tan tanh tanpi trunc clamp mix saturate sign smoothstep step"
    " all any isfinite isinf isnan isnormal isordered isunordered not select signbit"
    " cross distance distance_squared dot faceforward length length_squared normalize"
    " reflect refract determinant transpose"
    # integer (6.3)
    " absdiff addsat clz ctz extract_bits hadd insert_bits mad24 madhi madsat mul24 mulhi"
    " popcount reverse_bits rhadd rotate subsat"
    # SIMD-group and quad-group (6.9.2)
    " simd_active_threads_mask simd_all simd_and simd_any simd_ballot simd_broadcast"
    " simd_broadcast_first simd_is_first simd_is_helper_thread simd_max simd_min simd_or"
    " simd_prefix_exclusive_product simd_prefix_exclusive_sum simd_prefix_inclusive_product"
    " simd_prefix_inclusive_sum simd_product simd_shuffle simd_shuffle_and_fill_down"
    " simd_shuffle_and_fill_up simd_shuffle_down simd_shuffle_rotate_down"
    " simd_shuffle_rotate_up simd_shuffle_up simd_shuffle_xor simd_sum simd_xor"
    " quad_all quad_and quad_any quad_broadcast"
    " quad_broadcast_first quad_is_first quad_is_helper_thread quad_max quad_min quad_or"
    " quad_prefix_exclusive_product quad_prefix_exclusive_sum quad_prefix_inclusive_product"
    " quad_prefix_inclusive_sum quad_product quad_shuffle quad_shuffle_and_fill_down"
    " quad_shuffle_and_fill_up quad_shuffle_down quad_shuffle_rotate_down"
    " quad_shuffle_rotate_up quad_shuffle_up quad_shuffle_xor quad_sum quad_xor"
    # synchronization (6.9.1) and atomics (6.15)
    " threadgroup_barrier simdgroup_barrier atomic_thread_fence atomic_init"
    " atomic_load_explicit atomic_store_explicit atomic_exchange_explicit"
    " atomic_compare_exchange_weak_explicit atomic_fetch_add_explicit"
    " atomic_fetch_sub_explicit atomic_fetch_and_explicit atomic_fetch_or_explicit"
    " atomic_fetch_xor_explicit atomic_fetch_min_explicit atomic_fetch_max_explicit"
    " atomic_max_explicit atomic_min_explicit"
    # simdgroup matrices (6.7.x), conversions (2.13) and packing (6.14)
    " simdgroup_load simdgroup_store simdgroup_multiply simdgroup_multiply_accumulate"
    " make_filled_simdgroup_matrix as_type pack_float_to_unorm4x8 pack_float_to_snorm4x8"
    " pack_half_to_unorm4x8 pack_half_to_snorm4x8 pack_float_to_unorm2x16"
    " pack_float_to_snorm2x16 pack_half_to_unorm2x16 pack_half_to_snorm2x16"
    " unpack_unorm4x8_to_float unpack_snorm4x8_to_float unpack_unorm4x8_to_half"
    " unpack_snorm4x8_to_half unpack_unorm2x16_to_float unpack_snorm2x16_to_float"
    " unpack_unorm2x16_to_half unpack_snorm2x16_to_half".split()
)
METAL_CONSTANTS = set(
    "MAXFLOAT HUGE_VALF INFINITY NAN FLT_DIG FLT_MANT_DIG FLT_MAX_10_EXP FLT_MAX_EXP"
    " FLT_MIN_10_EXP FLT_MIN_EXP FLT_RADIX FLT_MAX FLT_MIN FLT_EPSILON HALF_DIG HALF_MANT_DIG"
    " HALF_MAX_10_EXP HALF_MAX_EXP HALF_MIN_10_EXP HALF_MIN_EXP HALF_RADIX HALF_MAX HALF_MIN"
    " HALF_EPSILON MAXHALF HUGE_VALH CHAR_BIT SCHAR_MAX SCHAR_MIN UCHAR_MAX CHAR_MAX CHAR_MIN"
    " USHRT_MAX SHRT_MAX SHRT_MIN UINT_MAX INT_MAX INT_MIN ULONG_MAX LONG_MAX LONG_MIN"
    " M_E_F M_LOG2E_F M_LOG10E_F M_LN2_F M_LN10_F M_PI_F M_PI_2_F M_PI_4_F M_1_PI_F M_2_PI_F"
    " M_2_SQRTPI_F M_SQRT2_F M_SQRT1_2_F M_E_H M_LOG2E_H M_LOG10E_H M_LN2_H M_LN10_H M_PI_H"
    " M_PI_2_H M_PI_4_H M_1_PI_H M_2_PI_H M_2_SQRTPI_H M_SQRT2_H M_SQRT1_2_H METAL_FUNC"
    " __METAL_VERSION__ __METAL__".split()
)
_METAL_NAMESPACES = {"metal", "fast", "precise"}
# MLX's prelude: mlx/backend/metal/kernels/utils.h with bf16.h, bf16_math.h,
# complex.h, defines.h and logging.h.
MLX_PRELUDE_NAMES = set(
    "Limits WorkPerThread elem_to_loc elem_to_loc_1 elem_to_loc_2 elem_to_loc_3"
    " elem_to_loc_2_nd elem_to_loc_3_nd LoopedElemToLoc ceildiv log1p hypot"
    " ConditionalType cast_to schedule_row_tile float16_t bfloat16_t bfloat16_to_uint16"
    " uint16_to_bfloat16 complex_t complex32_t complex64_t is_complex_v is_lane_convertible_v"
    " mlx os_log MLX_MTL_PRAGMA_UNROLL MTL_CONST MAX_REDUCE_SPECIALIZED_DIMS REDUCE_N_READS"
    " REDUCE_N_WRITES SOFTMAX_N_READS RMS_N_READS RMS_LOOPED_LIMIT CROSS_ENTROPY_N_READS"
    " instantiate_kernel".split()
)
_CPP_KEYWORDS = set(
    "alignas alignof auto bool break case char class const constexpr const_cast continue"
    " decltype default do else enum explicit extern false float for friend if inline int long"
    " mutable namespace noexcept nullptr operator private protected public register"
    " reinterpret_cast return short signed sizeof static static_assert static_cast struct"
    " switch template this true typedef typename union unsigned using void volatile while"
    " defined _Pragma"
    # Metal's address spaces, function qualifiers and attributes
    " device constant thread threadgroup threadgroup_imageblock ray_data object_data"
    " kernel vertex fragment visible".split()
)
_ALLOWED = METAL_TYPES | METAL_FUNCTIONS | METAL_CONSTANTS | _METAL_NAMESPACES | MLX_PRELUDE_NAMES
# Names after which the next name is not one being declared.
_STATEMENT_KEYWORDS = {"return", "else", "case", "do", "sizeof", "operator", "goto", "throw", "new"}
_DECLARING_KEYWORDS = {"struct", "class", "union", "enum", "namespace", "typename"}

_TOKEN = re.compile(
    r"(?P<number>\.?\d(?:[eEpP][+-]|[\w.])*)|(?P<name>[A-Za-z_]\w*)|(?P<punct>::|->|&&|\S)"
)
_DIRECTIVE = re.compile(r"^[ \t]*#(?:[^\n\\]|\\.)*", re.MULTILINE | re.DOTALL)
_DEFINE = re.compile(r"#\s*define\s+([A-Za-z_]\w*)(?:\(([^)]*)\))?")
_ATTRIBUTE = re.compile(r"\[\[.*?\]\]", re.DOTALL)


@dataclass(frozen=True)
class _Token:
    text: str
    offset: int
    is_name: bool


def _tokens(code: str) -> list[_Token]:
    """The code's tokens, preprocessor directives and attributes left out
    (a #define's body stays: it is code)."""

    def blank(match: re.Match[str]) -> str:
        text = match.group(0)
        define = _DEFINE.match(text.strip())
        body = text[text.index(define.group(0)) + len(define.group(0)) :] if define else ""
        head = len(text) - len(body)
        return re.sub(r"[^\n]", " ", text[:head]) + body.replace("\\\n", " \n")

    code = _ATTRIBUTE.sub(lambda match: re.sub(r"[^\n]", " ", match.group(0)), code)
    code = _DIRECTIVE.sub(blank, code)
    return [
        _Token(match.group(0), match.start(), match.lastgroup == "name")
        for match in _TOKEN.finditer(code)
        if match.lastgroup != "number"
    ]


def _defined_names(code: str) -> set[str]:
    """Names the code defines: macros and their parameters, types,
    functions, variables and parameters, template parameters, enumerators."""
    defined = set()
    for match in _DEFINE.finditer(code):
        defined.add(match.group(1))
        defined |= {parameter.strip() for parameter in (match.group(2) or "").split(",")}
    tokens = _tokens(code)
    for index, token in enumerate(tokens):
        if token.is_name and _is_declared(tokens, index):
            defined.add(token.text)
    defined |= _enumerators(tokens)
    return defined - {""}


def _is_declared(tokens: list[_Token], index: int) -> bool:
    """Whether tokens[index] is the name a declaration introduces, as `x` in
    `float x`, `T* x`, `vec<T, 2> x`, `struct x` or `using x =`."""
    name = tokens[index].text
    if name in _CPP_KEYWORDS or index == 0:
        return False
    before = tokens[index - 1]
    after = tokens[index + 1].text if index + 1 < len(tokens) else ";"
    if before.text in _DECLARING_KEYWORDS or (before.text == "using" and after == "="):
        return True
    if before.is_name:
        return before.text not in _STATEMENT_KEYWORDS
    if before.text == ",":  # `float a = 0, b = 1;`, `uint i, j;`
        return after in ("=", ";", "[", ",")
    if before.text in (">", "*", "&", "&&"):
        if after == "(":  # a function definition, or `vec<T, 2> x(...);`
            follower = _follows_parentheses(tokens, index + 1)
            return follower == "{" or (
                follower in (";", ",") and _template_type_starts(tokens, index - 1)
            )
        return after in ("=", ";", ",", ")", "[", ":", "{")
    return False


def _template_type_starts(tokens: list[_Token], closing: int) -> bool:
    """Whether the `>` at `closing` ends a template type that starts a
    statement, as `vec<T, 2>` in `; vec<T, 2> x(...)`."""
    if tokens[closing].text != ">":
        return False
    depth = 0
    for index in range(closing, 0, -1):
        depth += {">": 1, "<": -1}.get(tokens[index].text, 0)
        if depth == 0:
            start = index - 2  # the token before the template's name
            return start < 0 or tokens[start].text in {"{", "}", ";", ":", *_CPP_KEYWORDS}
    return False


def _follows_parentheses(tokens: list[_Token], opening: int) -> str:
    """The token after the parenthesized group that starts at `opening`
    (past a `const`), or "" at the end of the code."""
    depth = 0
    for index in range(opening, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[index].text, 0)
        if depth == 0:
            rest = [token.text for token in tokens[index + 1 : index + 3]]
            if rest[:1] == ["const"]:
                rest = rest[1:]
            return rest[0] if rest else ""
    return ""


def _enumerators(tokens: list[_Token]) -> set[str]:
    names = set()
    for index, token in enumerate(tokens):
        if token.text != "enum":
            continue
        opening = next(
            (i for i in range(index, len(tokens)) if tokens[i].text in ("{", ";")), len(tokens)
        )
        expects_name = True
        for inner in tokens[opening + 1 :]:
            if inner.text == "}":
                break
            if expects_name and inner.is_name:
                names.add(inner.text)
            expects_name = inner.text == ","
    return names


def _unknown_names(code: str, defined: set[str]) -> list[Problem]:
    """Functions called and types named that are neither defined nor allowed."""
    rule = (
        "neither defined in the kernel nor part of the Metal standard library or of MLX's "
        "prelude (unknown to the Metal compiler)"
    )
    known = defined | _ALLOWED | _CPP_KEYWORDS
    tokens = _tokens(code)
    problems = []
    for index in range(len(tokens)):
        name = _name_used_at(tokens, index)
        if name is not None and name.text not in known:
            problems.append((name.offset, rule, name.text))
    return problems


def _name_used_at(tokens: list[_Token], index: int) -> _Token | None:
    """The name that tokens[index] calls or uses as a type, if it does:
    `f` in `f(`, `T` in `T<` or `T x`, the name after `metal::` (and
    `fast::`, `precise::`) in a qualified name, the first of any other."""
    token = tokens[index]
    if not token.is_name:
        return None
    before = tokens[index - 1].text if index else ""
    after = tokens[index + 1].text if index + 1 < len(tokens) else ""
    if before in (".", "->"):
        return None
    if before == "::":
        qualifier = tokens[index - 2].text if index >= 2 else ""
        if qualifier in _METAL_NAMESPACES and token.text not in _METAL_NAMESPACES:
            return token
        return None
    if after in ("(", "<", "::"):
        return token
    if index + 1 < len(tokens) and _is_declared(tokens, index + 1) and tokens[index + 1].is_name:
        return token
    return None
