// Metal Shading Language compatibility layer for running MLX custom Metal
// kernels on the CPU (see metal_kernel.py). Each emulated kernel is compiled
// as a single C++17 translation unit that includes this header first and then
// places the kernel inside namespace metal::kernel_scope, so that unqualified
// calls such as exp(x) or max(a, b) find the Metal overloads below before any
// C library function of the same name.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace metal {

using uchar = unsigned char;
using ushort = unsigned short;
using uint = unsigned int;
using ulong = unsigned long;

// ---------------------------------------------------------------------------
// half and bfloat: 16-bit storage, arithmetic in float rounded back after each
// operation (round to nearest even), as the GPU does for native 16-bit types.

struct half_format {
  static uint16_t from_float(float value) {
    uint32_t bits = __builtin_bit_cast(uint32_t, value);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) {  // inf or nan
      return sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u);
    }
    if (magnitude >= 0x477ff000u) {  // rounds past 65504: overflow to inf
      return sign | 0x7c00u;
    }
    if (magnitude < 0x38800000u) {
      // Below the smallest normal half: adding 0.5f aligns the float's last
      // mantissa bit with the half subnormal step 2^-24, so the FPU rounds.
      float shifted = __builtin_bit_cast(float, magnitude) + 0.5f;
      return sign | (__builtin_bit_cast(uint32_t, shifted) - 0x3f000000u);
    }
    uint32_t mantissa_odd = (magnitude >> 13) & 1u;
    uint32_t rebiased = magnitude - ((127u - 15u) << 23);
    return sign | ((rebiased + 0xfffu + mantissa_odd) >> 13);
  }
  static float to_float(uint16_t value) {
    uint32_t sign = uint32_t(value & 0x8000u) << 16;
    uint32_t exponent = (value >> 10) & 0x1fu;
    uint32_t mantissa = value & 0x3ffu;
    if (exponent == 0) {
      float subnormal = float(mantissa) * 0x1p-24f;
      return __builtin_bit_cast(float, sign | __builtin_bit_cast(uint32_t, subnormal));
    }
    if (exponent == 31) {
      return __builtin_bit_cast(float, sign | 0x7f800000u | (mantissa << 13));
    }
    return __builtin_bit_cast(float, sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
};

struct bfloat_format {
  static uint16_t from_float(float value) {
    uint32_t bits = __builtin_bit_cast(uint32_t, value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((bits >> 16) | 0x40u);  // keep nan quiet
    }
    return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  static float to_float(uint16_t value) {
    return __builtin_bit_cast(float, uint32_t(value) << 16);
  }
};

template <class Format>
struct small_float {
  uint16_t bits;

  small_float() = default;
  template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  constexpr small_float(T value) : bits(Format::from_float(float(value))) {}
  template <class OtherFormat>
  small_float(small_float<OtherFormat> other) : small_float(float(other)) {}

  operator float() const { return Format::to_float(bits); }

  small_float& operator++() { return *this = float(*this) + 1.0f; }
  small_float& operator--() { return *this = float(*this) - 1.0f; }
  small_float operator++(int) { small_float old = *this; ++*this; return old; }
  small_float operator--(int) { small_float old = *this; --*this; return old; }
};

using half = small_float<half_format>;
using bfloat = small_float<bfloat_format>;
using float16_t = half;
using bfloat16_t = bfloat;

template <class T>
struct is_small_float : std::false_type {};
template <class Format>
struct is_small_float<small_float<Format>> : std::true_type {};

// A 16-bit float mixed with a float (or double) computes in that type; mixed
// with an integer it stays 16-bit.
template <class Format, class U>
using small_float_mix = std::conditional_t<std::is_floating_point_v<U>, U, small_float<Format>>;

#define MLX_FM_SMALL_FLOAT_ARITHMETIC(op)                                        \
  template <class F>                                                             \
  small_float<F> operator op(small_float<F> a, small_float<F> b) {               \
    return small_float<F>(float(a) op float(b));                                 \
  }                                                                              \
  template <class F, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0> \
  small_float_mix<F, U> operator op(small_float<F> a, U b) {                     \
    return small_float_mix<F, U>(float(a) op b);                                 \
  }                                                                              \
  template <class F, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0> \
  small_float_mix<F, U> operator op(U a, small_float<F> b) {                     \
    return small_float_mix<F, U>(a op float(b));                                 \
  }                                                                              \
  template <class F, class U>                                                    \
  small_float<F>& operator op##=(small_float<F>& a, U b) {                       \
    return a = small_float<F>(float(a) op b);                                    \
  }

MLX_FM_SMALL_FLOAT_ARITHMETIC(+)
MLX_FM_SMALL_FLOAT_ARITHMETIC(-)
MLX_FM_SMALL_FLOAT_ARITHMETIC(*)
MLX_FM_SMALL_FLOAT_ARITHMETIC(/)
#undef MLX_FM_SMALL_FLOAT_ARITHMETIC

#define MLX_FM_SMALL_FLOAT_COMPARISON(op)                                        \
  template <class F>                                                             \
  bool operator op(small_float<F> a, small_float<F> b) { return float(a) op float(b); } \
  template <class F, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0> \
  bool operator op(small_float<F> a, U b) { return float(a) op b; }              \
  template <class F, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0> \
  bool operator op(U a, small_float<F> b) { return a op float(b); }

MLX_FM_SMALL_FLOAT_COMPARISON(==)
MLX_FM_SMALL_FLOAT_COMPARISON(!=)
MLX_FM_SMALL_FLOAT_COMPARISON(<)
MLX_FM_SMALL_FLOAT_COMPARISON(<=)
MLX_FM_SMALL_FLOAT_COMPARISON(>)
MLX_FM_SMALL_FLOAT_COMPARISON(>=)
#undef MLX_FM_SMALL_FLOAT_COMPARISON

template <class F>
small_float<F> operator-(small_float<F> a) {
  small_float<F> negated;
  negated.bits = a.bits ^ 0x8000u;
  return negated;
}
template <class F>
small_float<F> operator+(small_float<F> a) { return a; }

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

template <class Format, uint16_t MaxBits, uint16_t MinBits, uint16_t EpsilonBits>
struct small_float_limits {
  using type = small_float<Format>;
  static constexpr bool is_specialized = true;
  static type from_bits(uint16_t bits) { type value; value.bits = bits; return value; }
  static type max() { return from_bits(MaxBits); }
  static type min() { return from_bits(MinBits); }
  static type lowest() { return from_bits(MaxBits | 0x8000u); }
  static type epsilon() { return from_bits(EpsilonBits); }
  static type infinity() { return type(std::numeric_limits<float>::infinity()); }
  static type quiet_NaN() { return type(std::numeric_limits<float>::quiet_NaN()); }
};
template <>
struct numeric_limits<half> : small_float_limits<half_format, 0x7bff, 0x0400, 0x1400> {};
template <>
struct numeric_limits<bfloat> : small_float_limits<bfloat_format, 0x7f7f, 0x0080, 0x3c00> {};

template <class To, class From>
To as_type(From value) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  To result;
  std::memcpy(&result, &value, sizeof(To));
  return result;
}

// ---------------------------------------------------------------------------
// Vector types. Size and alignment follow Metal: a 3-vector occupies 4 slots.

template <class T, int N>
struct vec_storage;
template <class T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union { T elements[2]; struct { T x, y; }; };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union { T elements[3]; struct { T x, y, z; }; };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union { T elements[4]; struct { T x, y, z, w; }; };
};

template <class T, int N>
struct vec;

template <class T>
struct component_count : std::integral_constant<int, 1> {};
template <class T, int N>
struct component_count<vec<T, N>> : std::integral_constant<int, N> {};

template <class T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  template <class U, std::enable_if_t<std::is_arithmetic_v<U> || is_small_float<U>::value, int> = 0>
  vec(U scalar) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(scalar);
  }
  // Component-wise construction from scalars and smaller vectors, as in
  // float4(xy, z, w).
  template <class... Parts, std::enable_if_t<(sizeof...(Parts) >= 2) &&
                                              ((component_count<Parts>::value + ...) == N), int> = 0>
  vec(Parts... parts) {
    int next = 0;
    (append(next, parts), ...);
  }
  template <class U>
  explicit vec(vec<U, N> other) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(other[i]);
  }

  T& operator[](int i) { return this->elements[i]; }
  const T& operator[](int i) const { return this->elements[i]; }

 private:
  template <class U>
  void append(int& next, U scalar) { (*this)[next++] = T(scalar); }
  template <class U, int M>
  void append(int& next, vec<U, M> part) {
    for (int i = 0; i < M; ++i) (*this)[next++] = T(part[i]);
  }
};

#define MLX_FM_VEC_BINARY(op)                                                         \
  template <class T, int N>                                                           \
  vec<T, N> operator op(vec<T, N> a, vec<T, N> b) {                                   \
    vec<T, N> r;                                                                      \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                  \
    return r;                                                                         \
  }                                                                                   \
  template <class T, int N, class U,                                                  \
            std::enable_if_t<std::is_arithmetic_v<U> || is_small_float<U>::value, int> = 0> \
  vec<T, N> operator op(vec<T, N> a, U b) { return a op vec<T, N>(b); }               \
  template <class T, int N, class U,                                                  \
            std::enable_if_t<std::is_arithmetic_v<U> || is_small_float<U>::value, int> = 0> \
  vec<T, N> operator op(U a, vec<T, N> b) { return vec<T, N>(a) op b; }               \
  template <class T, int N, class U>                                                  \
  vec<T, N>& operator op##=(vec<T, N>& a, U b) { return a = a op b; }

MLX_FM_VEC_BINARY(+)
MLX_FM_VEC_BINARY(-)
MLX_FM_VEC_BINARY(*)
MLX_FM_VEC_BINARY(/)
MLX_FM_VEC_BINARY(%)
MLX_FM_VEC_BINARY(&)
MLX_FM_VEC_BINARY(|)
MLX_FM_VEC_BINARY(^)
MLX_FM_VEC_BINARY(<<)
MLX_FM_VEC_BINARY(>>)
#undef MLX_FM_VEC_BINARY

#define MLX_FM_VEC_COMPARISON(op)                                       \
  template <class T, int N>                                             \
  vec<bool, N> operator op(vec<T, N> a, vec<T, N> b) {                  \
    vec<bool, N> r;                                                     \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                    \
    return r;                                                           \
  }

MLX_FM_VEC_COMPARISON(==)
MLX_FM_VEC_COMPARISON(!=)
MLX_FM_VEC_COMPARISON(<)
MLX_FM_VEC_COMPARISON(<=)
MLX_FM_VEC_COMPARISON(>)
MLX_FM_VEC_COMPARISON(>=)
#undef MLX_FM_VEC_COMPARISON

template <class T, int N>
vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a[i] = -a[i];
  return a;
}

template <int N>
bool all(vec<bool, N> v) {
  for (int i = 0; i < N; ++i) if (!v[i]) return false;
  return true;
}
template <int N>
bool any(vec<bool, N> v) {
  for (int i = 0; i < N; ++i) if (v[i]) return true;
  return false;
}

template <class T, int N>
T dot(vec<T, N> a, vec<T, N> b) {
  T sum = a[0] * b[0];
  for (int i = 1; i < N; ++i) sum += a[i] * b[i];
  return sum;
}

#define MLX_FM_VEC_ALIASES(type)      \
  using type##2 = vec<type, 2>;       \
  using type##3 = vec<type, 3>;       \
  using type##4 = vec<type, 4>;

MLX_FM_VEC_ALIASES(float)
MLX_FM_VEC_ALIASES(half)
MLX_FM_VEC_ALIASES(bfloat)
MLX_FM_VEC_ALIASES(int)
MLX_FM_VEC_ALIASES(uint)
MLX_FM_VEC_ALIASES(short)
MLX_FM_VEC_ALIASES(ushort)
MLX_FM_VEC_ALIASES(char)
MLX_FM_VEC_ALIASES(uchar)
MLX_FM_VEC_ALIASES(long)
MLX_FM_VEC_ALIASES(ulong)
MLX_FM_VEC_ALIASES(bool)
#undef MLX_FM_VEC_ALIASES

// ---------------------------------------------------------------------------
// Math. Floating-point functions exist for float, half and bfloat (16-bit
// types compute in float) and apply element-wise to vectors. The fast:: and
// precise:: variants are the same correctly rounded CPU functions.

template <class T, int N, class Function>
vec<T, N> map_components(vec<T, N> v, Function function) {
  for (int i = 0; i < N; ++i) v[i] = function(v[i]);
  return v;
}

#define MLX_FM_PUBLISH(name) \
  namespace fast { using ::metal::name; }   \
  namespace precise { using ::metal::name; }

#define MLX_FM_UNARY_MATH(name, expression)                                         \
  inline float name(float x) { return expression; }                                 \
  inline half name(half h) { float x = h; return half(expression); }               \
  inline bfloat name(bfloat b) { float x = b; return bfloat(expression); }          \
  template <class T, int N>                                                         \
  vec<T, N> name(vec<T, N> v) { return map_components(v, [](T c) { return name(c); }); } \
  MLX_FM_PUBLISH(name)

MLX_FM_UNARY_MATH(exp, std::exp(x))
MLX_FM_UNARY_MATH(exp2, std::exp2(x))
MLX_FM_UNARY_MATH(exp10, std::pow(10.0f, x))
MLX_FM_UNARY_MATH(log, std::log(x))
MLX_FM_UNARY_MATH(log2, std::log2(x))
MLX_FM_UNARY_MATH(log10, std::log10(x))
MLX_FM_UNARY_MATH(log1p, std::log1p(x))
MLX_FM_UNARY_MATH(sqrt, std::sqrt(x))
MLX_FM_UNARY_MATH(rsqrt, 1.0f / std::sqrt(x))
MLX_FM_UNARY_MATH(sin, std::sin(x))
MLX_FM_UNARY_MATH(cos, std::cos(x))
MLX_FM_UNARY_MATH(tan, std::tan(x))
MLX_FM_UNARY_MATH(asin, std::asin(x))
MLX_FM_UNARY_MATH(acos, std::acos(x))
MLX_FM_UNARY_MATH(atan, std::atan(x))
MLX_FM_UNARY_MATH(sinh, std::sinh(x))
MLX_FM_UNARY_MATH(cosh, std::cosh(x))
MLX_FM_UNARY_MATH(tanh, std::tanh(x))
MLX_FM_UNARY_MATH(erf, std::erf(x))
MLX_FM_UNARY_MATH(floor, std::floor(x))
MLX_FM_UNARY_MATH(ceil, std::ceil(x))
MLX_FM_UNARY_MATH(round, std::round(x))
MLX_FM_UNARY_MATH(rint, std::nearbyint(x))
MLX_FM_UNARY_MATH(trunc, std::trunc(x))
MLX_FM_UNARY_MATH(fract, x - std::floor(x))
MLX_FM_UNARY_MATH(fabs, std::fabs(x))
MLX_FM_UNARY_MATH(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f))
MLX_FM_UNARY_MATH(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
#undef MLX_FM_UNARY_MATH

#define MLX_FM_BINARY_MATH(name, expression)                                          \
  inline float name(float x, float y) { return expression; }                          \
  inline half name(half hx, half hy) { float x = hx, y = hy; return half(expression); } \
  inline bfloat name(bfloat bx, bfloat by) { float x = bx, y = by; return bfloat(expression); } \
  template <class T, int N>                                                           \
  vec<T, N> name(vec<T, N> a, vec<T, N> b) {                                          \
    for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i]);                              \
    return a;                                                                         \
  }                                                                                   \
  MLX_FM_PUBLISH(name)

MLX_FM_BINARY_MATH(pow, std::pow(x, y))
MLX_FM_BINARY_MATH(powr, std::pow(x, y))
MLX_FM_BINARY_MATH(atan2, std::atan2(x, y))
MLX_FM_BINARY_MATH(fmod, std::fmod(x, y))
MLX_FM_BINARY_MATH(fmax, std::fmax(x, y))
MLX_FM_BINARY_MATH(fmin, std::fmin(x, y))
MLX_FM_BINARY_MATH(copysign, std::copysign(x, y))
MLX_FM_BINARY_MATH(divide, x / y)
MLX_FM_BINARY_MATH(step, y < x ? 0.0f : 1.0f)
#undef MLX_FM_BINARY_MATH

#define MLX_FM_TERNARY_MATH(name, expression)                                         \
  inline float name(float x, float y, float z) { return expression; }                 \
  inline half name(half hx, half hy, half hz) {                                       \
    float x = hx, y = hy, z = hz;                                                     \
    return half(expression);                                                          \
  }                                                                                   \
  inline bfloat name(bfloat bx, bfloat by, bfloat bz) {                               \
    float x = bx, y = by, z = bz;                                                     \
    return bfloat(expression);                                                        \
  }                                                                                   \
  template <class T, int N>                                                           \
  vec<T, N> name(vec<T, N> a, vec<T, N> b, vec<T, N> c) {                             \
    for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i], c[i]);                        \
    return a;                                                                         \
  }                                                                                   \
  MLX_FM_PUBLISH(name)

MLX_FM_TERNARY_MATH(fma, std::fma(x, y, z))
MLX_FM_TERNARY_MATH(mix, x + (y - x) * z)
#undef MLX_FM_TERNARY_MATH

// max, min, abs and clamp also take integers; like Metal's per-type
// overloads, max(float, int) is ambiguous rather than silently converted.
#define MLX_FM_ORDERED_FUNCTIONS(T)                                        \
  inline T max(T a, T b) { return a < b ? b : a; }                         \
  inline T min(T a, T b) { return b < a ? b : a; }                         \
  inline T clamp(T x, T low, T high) { return min(max(x, low), high); }    \
  inline T abs(T x) { return x < T(0) ? T(-x) : x; }

MLX_FM_ORDERED_FUNCTIONS(float)
MLX_FM_ORDERED_FUNCTIONS(half)
MLX_FM_ORDERED_FUNCTIONS(bfloat)
MLX_FM_ORDERED_FUNCTIONS(char)
MLX_FM_ORDERED_FUNCTIONS(short)
MLX_FM_ORDERED_FUNCTIONS(int)
MLX_FM_ORDERED_FUNCTIONS(long)
MLX_FM_ORDERED_FUNCTIONS(uchar)
MLX_FM_ORDERED_FUNCTIONS(ushort)
MLX_FM_ORDERED_FUNCTIONS(uint)
MLX_FM_ORDERED_FUNCTIONS(ulong)
#undef MLX_FM_ORDERED_FUNCTIONS

template <class T, int N>
vec<T, N> max(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = max(a[i], b[i]);
  return a;
}
template <class T, int N>
vec<T, N> min(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = min(a[i], b[i]);
  return a;
}
template <class T, int N>
vec<T, N> abs(vec<T, N> v) { return map_components(v, [](T c) { return abs(c); }); }
template <class T, int N>
vec<T, N> clamp(vec<T, N> v, vec<T, N> low, vec<T, N> high) { return min(max(v, low), high); }
template <class T, int N>
vec<T, N> clamp(vec<T, N> v, T low, T high) { return clamp(v, vec<T, N>(low), vec<T, N>(high)); }

MLX_FM_PUBLISH(max)
MLX_FM_PUBLISH(min)
MLX_FM_PUBLISH(clamp)
MLX_FM_PUBLISH(abs)
#undef MLX_FM_PUBLISH

template <class T>
bool isnan(T x) { return std::isnan(float(x)); }
template <class T>
bool isinf(T x) { return std::isinf(float(x)); }
template <class T>
bool isfinite(T x) { return std::isfinite(float(x)); }
template <class T>
T select(T if_false, T if_true, bool condition) { return condition ? if_true : if_false; }
template <class T, int N>
vec<T, N> select(vec<T, N> if_false, vec<T, N> if_true, vec<bool, N> condition) {
  for (int i = 0; i < N; ++i) if (condition[i]) if_false[i] = if_true[i];
  return if_false;
}

inline uint popcount(uint x) { return uint(__builtin_popcount(x)); }
inline uint clz(uint x) { return x == 0 ? 32u : uint(__builtin_clz(x)); }
inline uint ctz(uint x) { return x == 0 ? 32u : uint(__builtin_ctz(x)); }

// MLX's helper (mlx/backend/metal/kernels/utils.h) for strided inputs.
template <class IdxT = int64_t>
IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT location = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    location += IdxT(elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return location;
}

}  // namespace metal

// ---------------------------------------------------------------------------
// Execution model: one cooperative fiber per GPU thread of a threadgroup.
// Fibers switch only at barriers and SIMD-group collectives, which makes
// threadgroup memory (function-static storage, see metal_kernel.py) shared by
// exactly the threads of the threadgroup being run.

namespace mlx_fm_emulator {

constexpr int simd_width = 32;
constexpr int max_threads_per_threadgroup = 1024;
constexpr size_t simd_slot_bytes = 32;
constexpr size_t fiber_stack_bytes = 256 * 1024;

struct ThreadAttributes {
  metal::uint3 thread_position_in_grid;
  metal::uint3 thread_position_in_threadgroup;
  metal::uint3 threadgroup_position_in_grid;
  metal::uint3 threads_per_threadgroup;
  metal::uint3 dispatch_threads_per_threadgroup;
  metal::uint3 threads_per_grid;
  metal::uint3 threadgroups_per_grid;
  metal::uint3 grid_origin;
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;
};

using KernelInvoker = void (*)(void* kernel, const ThreadAttributes& attributes);

// --- context switching -----------------------------------------------------

#if defined(__x86_64__)
struct FiberContext {
  void* stack_pointer;
};

extern "C" void mlx_fm_fiber_switch(FiberContext* from, FiberContext* to);
extern "C" void mlx_fm_fiber_trampoline();
extern "C" void mlx_fm_fiber_main();

// Saves the callee-saved registers on the current stack, swaps stack
// pointers and restores the other fiber's registers; `ret` resumes it.
asm(R"(
    .text
    .p2align 4
    .hidden mlx_fm_fiber_switch
    .type mlx_fm_fiber_switch, @function
mlx_fm_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq (%rsi), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mlx_fm_fiber_switch, .-mlx_fm_fiber_switch

    .p2align 4
    .hidden mlx_fm_fiber_trampoline
    .type mlx_fm_fiber_trampoline, @function
mlx_fm_fiber_trampoline:
    call mlx_fm_fiber_main
    ud2
    .size mlx_fm_fiber_trampoline, .-mlx_fm_fiber_trampoline
)");

inline void switch_fiber(FiberContext& from, FiberContext& to) { mlx_fm_fiber_switch(&from, &to); }

inline void prepare_fiber(FiberContext& context, char* stack_base, size_t stack_bytes) {
  // Stack image popped by the first switch into this fiber: six
  // callee-saved registers, then the trampoline as return address. The
  // trampoline starts with a 16-byte aligned stack, as a call site would.
  auto top = reinterpret_cast<uintptr_t>(stack_base + stack_bytes) & ~uintptr_t(15);
  auto** slot = reinterpret_cast<void**>(top);
  *--slot = reinterpret_cast<void*>(&mlx_fm_fiber_trampoline);
  for (int i = 0; i < 6; ++i) *--slot = nullptr;
  context.stack_pointer = slot;
}
#else
struct FiberContext {
  ucontext_t context;
};

extern "C" void mlx_fm_fiber_main();

inline void switch_fiber(FiberContext& from, FiberContext& to) { swapcontext(&from.context, &to.context); }

inline void prepare_fiber(FiberContext& context, char* stack_base, size_t stack_bytes) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack_base;
  context.context.uc_stack.ss_size = stack_bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, &mlx_fm_fiber_main, 0);
}
#endif

// --- threadgroup state -----------------------------------------------------

struct SimdGroup {
  alignas(16) unsigned char slots[2][simd_width][simd_slot_bytes];
  uint32_t participants[2];  // lanes that took part in the exchange using slots[i]
  uint32_t live_lanes;       // lanes that have not returned from the kernel
  uint32_t arrived_lanes;
  uint32_t generation;
};

struct Fiber {
  FiberContext context;
  ThreadAttributes attributes;
  const uint32_t* wait_counter;  // blocked while *wait_counter == wait_value
  uint32_t wait_value;
  bool finished;
};

struct Threadgroup {
  int thread_count;
  int live_threads;
  int barrier_arrivals;
  uint32_t barrier_generation;
  SimdGroup simdgroups[max_threads_per_threadgroup / simd_width];
  Fiber fibers[max_threads_per_threadgroup];
};

struct Runtime {
  Threadgroup threadgroup;
  FiberContext scheduler_context;
  Fiber* current_fiber = nullptr;
  KernelInvoker invoke = nullptr;
  void* kernel = nullptr;
  char* stacks = nullptr;
  size_t stack_count = 0;
};

inline Runtime& runtime() {
  static Runtime instance;
  return instance;
}

inline Fiber& current_fiber() { return *runtime().current_fiber; }

inline SimdGroup& current_simdgroup() {
  return runtime().threadgroup.simdgroups[current_fiber().attributes.simdgroup_index_in_threadgroup];
}

inline void wait_while_unchanged(const uint32_t* counter, uint32_t value) {
  Runtime& state = runtime();
  state.current_fiber->wait_counter = counter;
  state.current_fiber->wait_value = value;
  switch_fiber(state.current_fiber->context, state.scheduler_context);
}

inline void release_simdgroup(SimdGroup& group) {
  group.participants[group.generation & 1] = group.arrived_lanes;
  group.arrived_lanes = 0;
  ++group.generation;
}

inline void release_barrier(Threadgroup& group) {
  group.barrier_arrivals = 0;
  ++group.barrier_generation;
}

inline void threadgroup_barrier() {
  Threadgroup& group = runtime().threadgroup;
  uint32_t generation = group.barrier_generation;
  if (++group.barrier_arrivals == group.live_threads) {
    release_barrier(group);
  } else {
    wait_while_unchanged(&group.barrier_generation, generation);
  }
}

// The values every participating lane of the SIMD-group passed to one
// collective call, indexed by lane.
template <class T>
struct SimdValues {
  T values[simd_width];
  uint32_t participants;
  uint32_t lane;

  bool participates(uint32_t lane_index) const { return (participants >> lane_index) & 1u; }
  uint32_t first_lane() const { return uint32_t(__builtin_ctz(participants)); }
};

// Slots are double-buffered by generation: a lane that has read exchange g
// may write exchange g + 1 while slower lanes still read exchange g, but it
// cannot reach g + 2 before all of them have arrived at g + 1.
template <class T>
SimdValues<T> simd_exchange(T value) {
  static_assert(sizeof(T) <= simd_slot_bytes, "SIMD-group function argument is too large");
  SimdGroup& group = current_simdgroup();
  uint32_t lane = current_fiber().attributes.thread_index_in_simdgroup;
  uint32_t generation = group.generation;
  unsigned char (*slots)[simd_slot_bytes] = group.slots[generation & 1];
  std::memcpy(slots[lane], &value, sizeof(T));
  group.arrived_lanes |= 1u << lane;
  if (group.arrived_lanes == group.live_lanes) {
    release_simdgroup(group);
  } else {
    wait_while_unchanged(&group.generation, generation);
  }
  SimdValues<T> exchanged;
  exchanged.participants = group.participants[generation & 1];
  exchanged.lane = lane;
  for (int i = 0; i < simd_width; ++i) {
    if (exchanged.participates(i)) std::memcpy(&exchanged.values[i], slots[i], sizeof(T));
  }
  return exchanged;
}

inline void simdgroup_barrier() { simd_exchange<char>(0); }

// Reduces lanes [first, first + width) pairwise (lane pairs at distance 1,
// then 2, 4, ...), the ascending butterfly Apple GPUs use for simd_sum, so
// every lane gets the same bits. Absent lanes contribute `identity`.
template <class T, class Op>
T tree_reduce(SimdValues<T> exchanged, uint32_t first, uint32_t width, T identity, Op op) {
  for (uint32_t i = first; i < first + width; ++i) {
    if (!exchanged.participates(i)) exchanged.values[i] = identity;
  }
  for (uint32_t distance = 1; distance < width; distance *= 2) {
    for (uint32_t i = first; i < first + width; i += 2 * distance) {
      exchanged.values[i] = op(exchanged.values[i], exchanged.values[i + distance]);
    }
  }
  return exchanged.values[first];
}

template <class T, class Op>
T prefix_reduce(const SimdValues<T>& exchanged, uint32_t begin, uint32_t end, T identity, Op op) {
  T accumulated = identity;
  for (uint32_t i = begin; i < end; ++i) {
    if (exchanged.participates(i)) accumulated = op(accumulated, exchanged.values[i]);
  }
  return accumulated;
}

// --- dispatch ----------------------------------------------------------------

inline bool reserve_stacks(size_t count, char* error, size_t error_size) {
  Runtime& state = runtime();
  if (state.stack_count >= count) return true;
  if (state.stacks) munmap(state.stacks, state.stack_count * fiber_stack_bytes);
  state.stack_count = 0;
  void* memory = mmap(nullptr, count * fiber_stack_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    std::snprintf(error, error_size, "could not map %zu fiber stacks", count);
    return false;
  }
  state.stacks = static_cast<char*>(memory);
  state.stack_count = count;
  // A guard page below each stack turns a stack overflow into a fault
  // instead of silently corrupting the neighbouring fiber's stack.
  long page = sysconf(_SC_PAGESIZE);
  for (size_t i = 0; i < count; ++i) mprotect(state.stacks + i * fiber_stack_bytes, page, PROT_NONE);
  return true;
}

// Defined here (not inline) because only the assembly trampoline calls it;
// each emulated kernel is a single translation unit including this header.
extern "C" __attribute__((used, visibility("hidden"))) void mlx_fm_fiber_main() {
  Runtime& state = runtime();
  Fiber& fiber = *state.current_fiber;
  state.invoke(state.kernel, fiber.attributes);
  fiber.finished = true;
  // A returned thread no longer counts towards barriers and collectives;
  // its departure may complete one that the others are waiting in.
  Threadgroup& group = state.threadgroup;
  if (--group.live_threads > 0 && group.barrier_arrivals == group.live_threads) {
    release_barrier(group);
  }
  SimdGroup& simd = group.simdgroups[fiber.attributes.simdgroup_index_in_threadgroup];
  simd.live_lanes &= ~(1u << fiber.attributes.thread_index_in_simdgroup);
  if (simd.arrived_lanes != 0 && simd.arrived_lanes == simd.live_lanes) release_simdgroup(simd);
  switch_fiber(fiber.context, state.scheduler_context);
}

inline bool run_fibers(Threadgroup& group, char* error, size_t error_size) {
  Runtime& state = runtime();
  int remaining = group.thread_count;
  while (remaining > 0) {
    bool progressed = false;
    for (int i = 0; i < group.thread_count; ++i) {
      Fiber& fiber = group.fibers[i];
      if (fiber.finished || (fiber.wait_counter && *fiber.wait_counter == fiber.wait_value)) continue;
      fiber.wait_counter = nullptr;
      state.current_fiber = &fiber;
      switch_fiber(state.scheduler_context, fiber.context);
      progressed = true;
      remaining -= fiber.finished;
    }
    if (!progressed) {
      std::snprintf(error, error_size,
                    "deadlock in threadgroup (%u, %u, %u): %d threads wait at barriers or SIMD-group "
                    "functions that the other threads of their threadgroup or SIMD-group never reach",
                    group.fibers[0].attributes.threadgroup_position_in_grid.x,
                    group.fibers[0].attributes.threadgroup_position_in_grid.y,
                    group.fibers[0].attributes.threadgroup_position_in_grid.z, remaining);
      return false;
    }
  }
  return true;
}

inline void start_threadgroup(Threadgroup& group, int thread_count) {
  Runtime& state = runtime();
  group.thread_count = thread_count;
  group.live_threads = thread_count;
  group.barrier_arrivals = 0;
  group.barrier_generation = 0;
  int simdgroup_count = (thread_count + simd_width - 1) / simd_width;
  for (int s = 0; s < simdgroup_count; ++s) {
    SimdGroup& simd = group.simdgroups[s];
    int lanes = thread_count - s * simd_width < simd_width ? thread_count - s * simd_width : simd_width;
    simd.live_lanes = lanes == simd_width ? ~0u : (1u << lanes) - 1u;
    simd.arrived_lanes = 0;
    simd.generation = 0;
  }
  for (int i = 0; i < thread_count; ++i) {
    Fiber& fiber = group.fibers[i];
    fiber.wait_counter = nullptr;
    fiber.finished = false;
    prepare_fiber(fiber.context, state.stacks + i * fiber_stack_bytes, fiber_stack_bytes);
  }
}

inline uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// Runs the grid as Metal's dispatchThreads does: `grid` counts threads and
// threadgroups at the upper edges are cut to the grid (their
// threads_per_threadgroup is the smaller, actual size).
inline int dispatch(const uint32_t* grid, const uint32_t* threadgroup_size, bool uses_synchronization,
                    KernelInvoker invoke, void* kernel, char* error, size_t error_size) {
  Runtime& state = runtime();
  state.invoke = invoke;
  state.kernel = kernel;
  metal::uint3 grid_size(grid[0], grid[1], grid[2]);
  metal::uint3 dispatch_size(threadgroup_size[0], threadgroup_size[1], threadgroup_size[2]);
  metal::uint3 group_count(ceil_div(grid[0], threadgroup_size[0]), ceil_div(grid[1], threadgroup_size[1]),
                           ceil_div(grid[2], threadgroup_size[2]));
  uint32_t dispatch_threads = dispatch_size.x * dispatch_size.y * dispatch_size.z;
  if (uses_synchronization && !reserve_stacks(dispatch_threads, error, error_size)) return 1;

  ThreadAttributes a{};
  a.threads_per_grid = grid_size;
  a.threadgroups_per_grid = group_count;
  a.dispatch_threads_per_threadgroup = dispatch_size;
  a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatch_threads, simd_width);
  a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatch_threads, 4);
  a.threads_per_simdgroup = simd_width;
  a.grid_origin = metal::uint3(0u);
  Threadgroup& group = state.threadgroup;
  for (uint32_t gz = 0; gz < group_count.z; ++gz) {
    for (uint32_t gy = 0; gy < group_count.y; ++gy) {
      for (uint32_t gx = 0; gx < group_count.x; ++gx) {
        metal::uint3 origin(gx * dispatch_size.x, gy * dispatch_size.y, gz * dispatch_size.z);
        metal::uint3 size = metal::min(dispatch_size, grid_size - origin);
        uint32_t thread_count = size.x * size.y * size.z;
        a.threadgroup_position_in_grid = metal::uint3(gx, gy, gz);
        a.threads_per_threadgroup = size;
        a.simdgroups_per_threadgroup = ceil_div(thread_count, simd_width);
        a.quadgroups_per_threadgroup = ceil_div(thread_count, 4);
        if (uses_synchronization) start_threadgroup(group, int(thread_count));
        for (uint32_t index = 0; index < thread_count; ++index) {
          metal::uint3 local(index % size.x, (index / size.x) % size.y, index / (size.x * size.y));
          a.thread_position_in_threadgroup = local;
          a.thread_position_in_grid = origin + local;
          a.thread_index_in_threadgroup = index;
          a.thread_index_in_simdgroup = index % simd_width;
          a.simdgroup_index_in_threadgroup = index / simd_width;
          a.thread_index_in_quadgroup = index % 4;
          a.quadgroup_index_in_threadgroup = index / 4;
          if (uses_synchronization) {
            group.fibers[index].attributes = a;
          } else {
            invoke(kernel, a);
          }
        }
        if (uses_synchronization && !run_fibers(group, error, error_size)) return 1;
      }
    }
  }
  return 0;
}

}  // namespace mlx_fm_emulator

// ---------------------------------------------------------------------------
// Synchronization, SIMD-group functions and atomics as kernels see them.

namespace metal {

enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint32_t(a) | uint32_t(b)); }

// Memory is shared and threads switch only at these calls, so synchronizing
// execution also orders all memory accesses, whatever the flags.
inline void threadgroup_barrier(mem_flags) { mlx_fm_emulator::threadgroup_barrier(); }
inline void simdgroup_barrier(mem_flags) { mlx_fm_emulator::simdgroup_barrier(); }

namespace simd_detail {
using mlx_fm_emulator::simd_exchange;
using mlx_fm_emulator::simd_width;
using mlx_fm_emulator::SimdValues;

template <class T>
T value_of_lane(const SimdValues<T>& exchanged, uint32_t source) {
  bool valid = source < uint32_t(simd_width) && exchanged.participates(source);
  return exchanged.values[valid ? source : exchanged.lane];
}

template <class T>
uint32_t group_base(const SimdValues<T>& exchanged, uint32_t width) {
  return exchanged.lane & ~(width - 1u);
}

template <class T, class Op>
T group_reduce(T value, uint32_t width, T identity, Op op) {
  SimdValues<T> exchanged = simd_exchange(value);
  return mlx_fm_emulator::tree_reduce(exchanged, group_base(exchanged, width), width, identity, op);
}

// For max, min, and, or: absent lanes may repeat any present value.
template <class T, class Op>
T group_reduce_idempotent(T value, uint32_t width, Op op) {
  SimdValues<T> exchanged = simd_exchange(value);
  return mlx_fm_emulator::tree_reduce(exchanged, group_base(exchanged, width), width, value, op);
}

template <class T, class Op>
T group_prefix(T value, uint32_t width, uint32_t inclusive, T identity, Op op) {
  SimdValues<T> exchanged = simd_exchange(value);
  return mlx_fm_emulator::prefix_reduce(exchanged, group_base(exchanged, width), exchanged.lane + inclusive,
                                        identity, op);
}

inline const auto add = [](auto a, auto b) { return a + b; };
inline const auto logical_and = [](bool a, bool b) { return a && b; };
inline const auto logical_or = [](bool a, bool b) { return a || b; };
inline const auto multiply = [](auto a, auto b) { return a * b; };
inline const auto maximum = [](auto a, auto b) { return max(a, b); };
inline const auto minimum = [](auto a, auto b) { return min(a, b); };
inline const auto bit_and = [](auto a, auto b) { return a & b; };
inline const auto bit_or = [](auto a, auto b) { return a | b; };
inline const auto bit_xor = [](auto a, auto b) { return a ^ b; };
}  // namespace simd_detail

#define MLX_FM_GROUP_FUNCTIONS(prefix, width)                                                 \
  template <class T> T prefix##_sum(T x) {                                                    \
    return simd_detail::group_reduce(x, width, T(0), simd_detail::add);                       \
  }                                                                                           \
  template <class T> T prefix##_product(T x) {                                                \
    return simd_detail::group_reduce(x, width, T(1), simd_detail::multiply);                  \
  }                                                                                           \
  template <class T> T prefix##_max(T x) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::maximum);              \
  }                                                                                           \
  template <class T> T prefix##_min(T x) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::minimum);              \
  }                                                                                           \
  template <class T> T prefix##_and(T x) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::bit_and);              \
  }                                                                                           \
  template <class T> T prefix##_or(T x) {                                                     \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::bit_or);               \
  }                                                                                           \
  template <class T> T prefix##_xor(T x) {                                                    \
    return simd_detail::group_reduce(x, width, T(0), simd_detail::bit_xor);                   \
  }                                                                                           \
  template <class T> T prefix##_shuffle(T x, ushort lane) {                                   \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + lane % (width)); \
  }                                                                                           \
  template <class T> T prefix##_broadcast(T x, ushort lane) { return prefix##_shuffle(x, lane); } \
  template <class T> T prefix##_shuffle_xor(T x, ushort mask) {                               \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    return simd_detail::value_of_lane(exchanged, exchanged.lane ^ (mask & ((width) - 1u)));   \
  }                                                                                           \
  template <class T> T prefix##_shuffle_up(T x, ushort delta) {                               \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    if (exchanged.lane % (width) < delta) return x;                                           \
    return simd_detail::value_of_lane(exchanged, exchanged.lane - delta);                     \
  }                                                                                           \
  template <class T> T prefix##_shuffle_down(T x, ushort delta) {                             \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    if (exchanged.lane % (width) + delta >= (width)) return x;                                \
    return simd_detail::value_of_lane(exchanged, exchanged.lane + delta);                     \
  }                                                                                           \
  template <class T> T prefix##_shuffle_rotate_up(T x, ushort delta) {                        \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    uint32_t position = (exchanged.lane + (width) - delta % (width)) % (width);               \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + position); \
  }                                                                                           \
  template <class T> T prefix##_shuffle_rotate_down(T x, ushort delta) {                      \
    auto exchanged = simd_detail::simd_exchange(x);                                           \
    uint32_t position = (exchanged.lane + delta) % (width);                                   \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + position); \
  }                                                                                           \
  template <class T> T prefix##_prefix_inclusive_sum(T x) {                                   \
    return simd_detail::group_prefix(x, width, 1, T(0), simd_detail::add);                    \
  }                                                                                           \
  template <class T> T prefix##_prefix_exclusive_sum(T x) {                                   \
    return simd_detail::group_prefix(x, width, 0, T(0), simd_detail::add);                    \
  }                                                                                           \
  template <class T> T prefix##_prefix_inclusive_product(T x) {                               \
    return simd_detail::group_prefix(x, width, 1, T(1), simd_detail::multiply);               \
  }                                                                                           \
  template <class T> T prefix##_prefix_exclusive_product(T x) {                               \
    return simd_detail::group_prefix(x, width, 0, T(1), simd_detail::multiply);               \
  }                                                                                           \
  inline bool prefix##_all(bool predicate) {                                                  \
    return simd_detail::group_reduce_idempotent(predicate, width, simd_detail::logical_and);  \
  }                                                                                           \
  inline bool prefix##_any(bool predicate) {                                                  \
    return simd_detail::group_reduce_idempotent(predicate, width, simd_detail::logical_or);   \
  }

MLX_FM_GROUP_FUNCTIONS(simd, 32u)
MLX_FM_GROUP_FUNCTIONS(quad, 4u)
#undef MLX_FM_GROUP_FUNCTIONS

template <class T>
T simd_broadcast_first(T x) {
  auto exchanged = simd_detail::simd_exchange(x);
  return exchanged.values[exchanged.first_lane()];
}

inline bool simd_is_first() {
  auto exchanged = simd_detail::simd_exchange(false);
  return exchanged.lane == exchanged.first_lane();
}

// Lanes whose predicate is true, as the bits of a 64-bit mask.
struct simd_vote {
  uint64_t mask;
  explicit operator uint64_t() const { return mask; }
  bool any() const { return mask != 0; }
};

inline simd_vote simd_ballot(bool predicate) {
  auto exchanged = simd_detail::simd_exchange(predicate);
  uint64_t mask = 0;
  for (int i = 0; i < simd_detail::simd_width; ++i) {
    if (exchanged.participates(i) && exchanged.values[i]) mask |= uint64_t(1) << i;
  }
  return simd_vote{mask};
}

inline simd_vote simd_active_threads_mask() { return simd_ballot(true); }

// Atomics: atomic<T> has the layout of T; operations use the compiler's
// atomic built-ins (floating-point read-modify-write by compare-exchange).
enum memory_order { memory_order_relaxed, memory_order_seq_cst };

template <class T>
struct atomic {
  T value;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_bool = atomic<bool>;
using atomic_float = atomic<float>;

template <class T>
void atomic_store_explicit(volatile atomic<T>* object, T desired, memory_order) {
  __atomic_store(&object->value, &desired, __ATOMIC_SEQ_CST);
}

template <class T>
T atomic_load_explicit(const volatile atomic<T>* object, memory_order) {
  T result;
  __atomic_load(&object->value, &result, __ATOMIC_SEQ_CST);
  return result;
}

template <class T>
T atomic_exchange_explicit(volatile atomic<T>* object, T desired, memory_order) {
  T previous;
  __atomic_exchange(&object->value, &desired, &previous, __ATOMIC_SEQ_CST);
  return previous;
}

template <class T>
bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* object, T* expected, T desired, memory_order,
                                           memory_order) {
  return __atomic_compare_exchange(&object->value, expected, &desired, false, __ATOMIC_SEQ_CST,
                                   __ATOMIC_SEQ_CST);
}

namespace atomic_detail {
template <class T, class Update>
T read_modify_write(volatile atomic<T>* object, Update update) {
  T expected = atomic_load_explicit(object, memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(object, &expected, T(update(expected)), memory_order_relaxed,
                                                memory_order_relaxed)) {
  }
  return expected;
}
}  // namespace atomic_detail

#define MLX_FM_ATOMIC_FETCH(name, expression)                                                        \
  template <class T, class U>                                                                        \
  T atomic_fetch_##name##_explicit(volatile atomic<T>* object, U operand, memory_order) {            \
    T argument = T(operand);                                                                         \
    return atomic_detail::read_modify_write(object, [argument](T current) { return expression; });  \
  }

MLX_FM_ATOMIC_FETCH(add, current + argument)
MLX_FM_ATOMIC_FETCH(sub, current - argument)
MLX_FM_ATOMIC_FETCH(max, max(current, argument))
MLX_FM_ATOMIC_FETCH(min, min(current, argument))
MLX_FM_ATOMIC_FETCH(and, current & argument)
MLX_FM_ATOMIC_FETCH(or, current | argument)
MLX_FM_ATOMIC_FETCH(xor, current ^ argument)
#undef MLX_FM_ATOMIC_FETCH

}  // namespace metal

// Address-space qualifiers carry no meaning on the CPU. Declarations of
// threadgroup storage are rewritten by metal_kernel.py before compilation;
// what remains of `threadgroup` qualifies pointers and references.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
