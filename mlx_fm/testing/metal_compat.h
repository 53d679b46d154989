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

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

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

  // From `constant` buffers, which the emulator makes volatile; a template,
  // so that the type stays trivially copyable.
  template <class F = Format>
  small_float(const volatile small_float<F>& other) : bits(other.bits) {}

  operator float() const { return Format::to_float(bits); }
  operator float() const volatile { return Format::to_float(bits); }

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
MLX_FM_UNARY_MATH(sqrt, std::sqrt(x))
MLX_FM_UNARY_MATH(rsqrt, 1.0f / std::sqrt(x))
MLX_FM_UNARY_MATH(sin, std::sin(x))
MLX_FM_UNARY_MATH(cos, std::cos(x))
MLX_FM_UNARY_MATH(tan, std::tan(x))
MLX_FM_UNARY_MATH(asin, std::asin(x))
MLX_FM_UNARY_MATH(acos, std::acos(x))
MLX_FM_UNARY_MATH(atan, std::atan(x))
MLX_FM_UNARY_MATH(acosh, std::acosh(x))
MLX_FM_UNARY_MATH(asinh, std::asinh(x))
MLX_FM_UNARY_MATH(atanh, std::atanh(x))
MLX_FM_UNARY_MATH(cospi, float(std::cos(M_PI * double(x))))
MLX_FM_UNARY_MATH(sinpi, float(std::sin(M_PI * double(x))))
MLX_FM_UNARY_MATH(tanpi, float(std::tan(M_PI * double(x))))
MLX_FM_UNARY_MATH(sinh, std::sinh(x))
MLX_FM_UNARY_MATH(cosh, std::cosh(x))
MLX_FM_UNARY_MATH(tanh, std::tanh(x))
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
MLX_FM_BINARY_MATH(fdim, std::fdim(x, y))
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
// For floating types Metal's max and min are fmax and fmin: a NaN argument
// yields the other one.
#define MLX_FM_ORDERED_FUNCTIONS(T)                                        \
  inline T max(T a, T b) { return a < b ? b : a; }                         \
  inline T min(T a, T b) { return b < a ? b : a; }                         \
  inline T clamp(T x, T low, T high) { return min(max(x, low), high); }    \
  inline T abs(T x) { return x < T(0) ? T(-x) : x; }
#define MLX_FM_FLOAT_ORDERED_FUNCTIONS(T)                                  \
  inline T max(T a, T b) { return T(std::fmax(float(a), float(b))); }      \
  inline T min(T a, T b) { return T(std::fmin(float(a), float(b))); }      \
  inline T clamp(T x, T low, T high) { return min(max(x, low), high); }    \
  inline T abs(T x) { return T(std::fabs(float(x))); }

MLX_FM_FLOAT_ORDERED_FUNCTIONS(float)
MLX_FM_FLOAT_ORDERED_FUNCTIONS(half)
MLX_FM_FLOAT_ORDERED_FUNCTIONS(bfloat)
#undef MLX_FM_FLOAT_ORDERED_FUNCTIONS
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

template <class T>
bool isnormal(T x) { return std::isnormal(float(x)); }
template <class T>
bool signbit(T x) { return std::signbit(float(x)); }
template <class T>
bool isordered(T x, T y) { return !isnan(x) && !isnan(y); }
template <class T>
bool isunordered(T x, T y) { return isnan(x) || isnan(y); }
template <int N>
vec<bool, N> operator!(vec<bool, N> v) {  // Metal's not(v); `not` is C++'s `!`
  for (int i = 0; i < N; ++i) v[i] = !v[i];
  return v;
}

template <class T>
T max3(T a, T b, T c) { return max(max(a, b), c); }
template <class T>
T min3(T a, T b, T c) { return min(min(a, b), c); }
template <class T>
T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
template <class T>
T fmax3(T a, T b, T c) { return fmax(fmax(a, b), c); }
template <class T>
T fmin3(T a, T b, T c) { return fmin(fmin(a, b), c); }
template <class T>
T fmedian3(T a, T b, T c) { return fmax(fmin(a, b), fmin(fmax(a, b), c)); }

template <class T>
T smoothstep(T edge0, T edge1, T x) {
  T t = clamp(T((x - edge0) / (edge1 - edge0)), T(0), T(1));
  return T(t * t * (T(3) - T(2) * t));
}
template <class T>
T ldexp(T x, int exponent) { return T(std::ldexp(float(x), exponent)); }
template <class T>
T frexp(T x, int& exponent) { return T(std::frexp(float(x), &exponent)); }
template <class T>
T modf(T x, T& integral_part) {
  float whole;
  float fraction = std::modf(float(x), &whole);
  integral_part = T(whole);
  return T(fraction);
}
template <class T>
int ilogb(T x) { return std::ilogb(float(x)); }
template <class T>
T sincos(T x, T& cosine) {
  cosine = cos(x);
  return sin(x);
}
inline float nextafter(float x, float y) { return std::nextafter(x, y); }
// The neighbour of x towards y in x's own 16-bit format.
template <class F>
small_float<F> nextafter(small_float<F> x, small_float<F> y) {
  if (isnan(x) || isnan(y)) return small_float<F>(float(x) + float(y));
  if (float(x) == float(y)) return y;
  small_float<F> next;
  if ((x.bits & 0x7fffu) == 0) {
    next.bits = uint16_t((y.bits & 0x8000u) | 1u);
  } else {
    bool away_from_zero = (float(x) < float(y)) == ((x.bits & 0x8000u) == 0);
    next.bits = uint16_t(away_from_zero ? x.bits + 1u : x.bits - 1u);
  }
  return next;
}

// Geometric functions.
template <class T, int N>
T length_squared(vec<T, N> v) { return dot(v, v); }
template <class T, int N>
T length(vec<T, N> v) { return sqrt(length_squared(v)); }
template <class T, int N>
T distance_squared(vec<T, N> a, vec<T, N> b) { return length_squared(a - b); }
template <class T, int N>
T distance(vec<T, N> a, vec<T, N> b) { return length(a - b); }
template <class T, int N>
vec<T, N> normalize(vec<T, N> v) { return v * rsqrt(length_squared(v)); }
template <class T>
vec<T, 3> cross(vec<T, 3> a, vec<T, 3> b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
template <class T, int N>
vec<T, N> reflect(vec<T, N> incident, vec<T, N> normal) {
  return incident - T(2) * dot(normal, incident) * normal;
}
template <class T, int N>
vec<T, N> faceforward(vec<T, N> normal, vec<T, N> incident, vec<T, N> reference) {
  return dot(reference, incident) < T(0) ? normal : -normal;
}
template <class T, int N>
vec<T, N> refract(vec<T, N> incident, vec<T, N> normal, T eta) {
  T cosine = dot(normal, incident);
  T k = T(1) - eta * eta * (T(1) - cosine * cosine);
  if (k < T(0)) return vec<T, N>(T(0));
  return eta * incident - (eta * cosine + sqrt(k)) * normal;
}

// Integer functions, for every integer type (and, element-wise, vectors of
// them for popcount, clz and ctz). Saturating and high-half arithmetic
// computes in a type twice as wide.
template <class T>
using if_integer = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int>;
template <class T>
using wider = std::conditional_t<(sizeof(T) < 8), std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>,
                                 std::conditional_t<std::is_signed_v<T>, __int128, unsigned __int128>>;
template <class T>
constexpr int bit_width = int(sizeof(T) * 8);
template <class T>
using unsigned_of = std::make_unsigned_t<T>;

template <class T, if_integer<T> = 0>
T popcount(T x) { return T(__builtin_popcountll(uint64_t(unsigned_of<T>(x)))); }
template <class T, if_integer<T> = 0>
T clz(T x) {
  uint64_t bits = uint64_t(unsigned_of<T>(x));
  return T(bits == 0 ? bit_width<T> : __builtin_clzll(bits) - (64 - bit_width<T>));
}
template <class T, if_integer<T> = 0>
T ctz(T x) {
  uint64_t bits = uint64_t(unsigned_of<T>(x));
  return T(bits == 0 ? bit_width<T> : __builtin_ctzll(bits));
}
template <class T, int N>
vec<T, N> popcount(vec<T, N> v) { return map_components(v, [](T c) { return popcount(c); }); }
template <class T, int N>
vec<T, N> clz(vec<T, N> v) { return map_components(v, [](T c) { return clz(c); }); }
template <class T, int N>
vec<T, N> ctz(vec<T, N> v) { return map_components(v, [](T c) { return ctz(c); }); }

template <class T, if_integer<T> = 0>
T saturated(wider<T> value) {
  wider<T> low = wider<T>(std::numeric_limits<T>::min()), high = wider<T>(std::numeric_limits<T>::max());
  return T(value < low ? low : (value > high ? high : value));
}
template <class T, if_integer<T> = 0>
T addsat(T x, T y) { return saturated<T>(wider<T>(x) + wider<T>(y)); }
template <class T, if_integer<T> = 0>
T subsat(T x, T y) { return saturated<T>(wider<T>(x) - wider<T>(y)); }
template <class T, if_integer<T> = 0>
T madsat(T x, T y, T z) { return saturated<T>(wider<T>(x) * wider<T>(y) + wider<T>(z)); }
template <class T, if_integer<T> = 0>
T absdiff(T x, T y) { return T(x > y ? wider<T>(x) - wider<T>(y) : wider<T>(y) - wider<T>(x)); }
template <class T, if_integer<T> = 0>
T hadd(T x, T y) { return T((wider<T>(x) + wider<T>(y)) >> 1); }
template <class T, if_integer<T> = 0>
T rhadd(T x, T y) { return T((wider<T>(x) + wider<T>(y) + 1) >> 1); }
template <class T, if_integer<T> = 0>
T mulhi(T x, T y) { return T((wider<T>(x) * wider<T>(y)) >> bit_width<T>); }
template <class T, if_integer<T> = 0>
T madhi(T x, T y, T z) { return T(mulhi(x, y) + z); }
// Metal leaves mul24 undefined past 24-bit operands: the full product is one answer.
template <class T, if_integer<T> = 0>
T mul24(T x, T y) { return T(x * y); }
template <class T, if_integer<T> = 0>
T mad24(T x, T y, T z) { return T(x * y + z); }
template <class T, if_integer<T> = 0>
T rotate(T value, T count) {
  unsigned_of<T> bits = unsigned_of<T>(value);
  int shift = int(unsigned_of<T>(count) % bit_width<T>);
  return T(shift == 0 ? bits : unsigned_of<T>((bits << shift) | (bits >> (bit_width<T> - shift))));
}
template <class T, if_integer<T> = 0>
T extract_bits(T value, uint offset, uint bits) {
  if (bits == 0) return T(0);
  unsigned_of<T> shifted = unsigned_of<T>(unsigned_of<T>(value) << (bit_width<T> - offset - bits));
  if (std::is_signed_v<T>) return T(T(shifted) >> (bit_width<T> - bits));  // sign-extended
  return T(shifted >> (bit_width<T> - bits));
}
template <class T, if_integer<T> = 0>
T insert_bits(T base, T insert, uint offset, uint bits) {
  unsigned_of<T> mask = bits == 0 ? 0 : unsigned_of<T>(unsigned_of<T>(~unsigned_of<T>(0)) >> (bit_width<T> - bits)) << offset;
  return T((unsigned_of<T>(base) & ~mask) | ((unsigned_of<T>(insert) << offset) & mask));
}
template <class T, if_integer<T> = 0>
T reverse_bits(T value) {
  unsigned_of<T> bits = unsigned_of<T>(value), reversed = 0;
  for (int i = 0; i < bit_width<T>; ++i) reversed = unsigned_of<T>(reversed | (((bits >> i) & 1u) << (bit_width<T> - 1 - i)));
  return T(reversed);
}

}  // namespace metal

// ---------------------------------------------------------------------------
// Execution model: one cooperative fiber per GPU thread of a threadgroup.
// Fibers switch only at barriers and SIMD-group functions. A scheduler runs
// every ready fiber in the launch's schedule order until it blocks; when all
// are blocked it first completes the pending SIMD-group functions (the lanes
// waiting at the same call site form the active lanes), and else releases the
// barrier, after checking Metal's rules for it. Threadgroup memory (static
// storage, see metal_kernel.py) is poisoned for each threadgroup. Errors abandon the launch with a message naming the rule and
// the kernel source line.

#if !defined(__clang__)
// What GCC's __builtin_source_location points to (C++17 lacks the header).
namespace std {
struct source_location {
  struct __impl {
    const char* _M_file_name;
    const char* _M_function_name;
    unsigned _M_line;
    unsigned _M_column;
  };
};
}  // namespace std
#endif

namespace mlx_fm_emulator {

constexpr int simd_width = 32;
constexpr int max_threads_per_threadgroup = 1024;
constexpr size_t simd_slot_bytes = 32;
constexpr size_t fiber_stack_bytes = 256 * 1024;
constexpr size_t signal_stack_bytes = 64 * 1024;
constexpr size_t threadgroup_memory_limit = 32 * 1024;

// A call site in the kernel source, found through default arguments.
struct Site {
  const char* file;
  int line;
  int column;
#if defined(__clang__)
  Site(const char* file = __builtin_FILE(), int line = __builtin_LINE(), int column = __builtin_COLUMN())
      : file(file), line(line), column(column) {}
#else
  // GCC has no __builtin_COLUMN; its source-location builtin fills this.
  struct Location {
    const char* file;
    const char* function;
    unsigned line;
    unsigned column;
  };
  Site(const void* location = __builtin_source_location())
      : file(static_cast<const Location*>(location)->file),
        line(int(static_cast<const Location*>(location)->line)),
        column(int(static_cast<const Location*>(location)->column)) {}
#endif
  Site(const char* file, int line, int column) : file(file), line(line), column(column) {}
  bool operator==(const Site& other) const {
    return line == other.line && column == other.column && std::strcmp(file, other.file) == 0;
  }
};

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

enum class Wait : uint8_t { ready, barrier, simd, finished };

struct Fiber {
  FiberContext context;
  ThreadAttributes attributes;
  Wait wait;
  Site site{"", 0, 0};           // of the barrier or SIMD-group function it waits at
  bool fences_threadgroup;    // its barrier orders threadgroup memory
  uint8_t slot_parity;        // the SimdGroup slots holding its pending value
};

struct SimdGroup {
  alignas(16) unsigned char slots[2][simd_width][simd_slot_bytes];
  uint32_t participants[simd_width];  // per lane: the lanes of its last exchange
  uint8_t parity;                     // slots that the next exchange writes
};

struct Threadgroup {
  int thread_count;
  int finished_threads;
  SimdGroup simdgroups[max_threads_per_threadgroup / simd_width];
  Fiber fibers[max_threads_per_threadgroup];
  int order[max_threads_per_threadgroup];
};

// A threadgroup variable (static storage, see metal_kernel.py), poisoned
// by the first thread of each threadgroup that reaches its declaration.
struct ThreadgroupVariable {
  void* address;
  size_t bytes;
  uint64_t poisoned_in;
};
constexpr int max_threadgroup_variables = 64;

// What a failed launch reports besides its message; read by metal_kernel.py.
struct Fault {
  uint64_t address;
  uint64_t is_write;
  uint64_t happened;
};

struct Runtime {
  Threadgroup threadgroup;
  FiberContext scheduler_context;
  Fiber* current_fiber = nullptr;
  KernelInvoker invoke = nullptr;
  void* kernel = nullptr;
  char* stacks = nullptr;
  size_t stack_count = 0;
  char* signal_stack = nullptr;
  int schedule = 0;  // 0: index order, 1: reverse order, >= 2: random, seeded by it
  uint64_t random_state = 1;
  bool failed = false;
  char* error = nullptr;
  size_t error_size = 0;
  Fault* fault = nullptr;
  ThreadgroupVariable threadgroup_variables[max_threadgroup_variables];
  int threadgroup_variable_count = 0;
  size_t threadgroup_bytes = 0;
  uint64_t threadgroup_serial = 0;  // counts the threadgroups started
};

inline Runtime& runtime() {
  static Runtime instance;
  return instance;
}

inline Fiber& current_fiber() { return *runtime().current_fiber; }

inline SimdGroup& current_simdgroup() {
  return runtime().threadgroup.simdgroups[current_fiber().attributes.simdgroup_index_in_threadgroup];
}

inline size_t threadgroup_memory_bytes() { return runtime().threadgroup_bytes; }

template <class... Arguments>
void report(const char* format, Arguments... arguments) {
  Runtime& state = runtime();
  if (!state.failed) std::snprintf(state.error, state.error_size, format, arguments...);
  state.failed = true;
}

inline void yield_to_scheduler();
template <class... Arguments>
[[noreturn]] void fail_thread(const char* format, Arguments... arguments);

// Called where a threadgroup variable is declared: poisons it (NaN for
// floating types, all ones for integers) once per threadgroup, and keeps the
// kernel within Metal's threadgroup memory.
inline void threadgroup_variable(void* address, size_t bytes) {
  Runtime& state = runtime();
  ThreadgroupVariable* variable = nullptr;
  for (int i = 0; i < state.threadgroup_variable_count; ++i) {
    if (state.threadgroup_variables[i].address == address) variable = &state.threadgroup_variables[i];
  }
  if (!variable) {
    if (state.threadgroup_variable_count == max_threadgroup_variables) {
      fail_thread("more than %d threadgroup variables", max_threadgroup_variables);
    }
    variable = &state.threadgroup_variables[state.threadgroup_variable_count++];
    *variable = ThreadgroupVariable{address, bytes, 0};
    state.threadgroup_bytes += bytes;
  }
  if (state.threadgroup_bytes > threadgroup_memory_limit) {
    fail_thread("the kernel declares %zu bytes of threadgroup memory; Metal allows %zu",
                state.threadgroup_bytes, threadgroup_memory_limit);
  }
  if (variable->poisoned_in != state.threadgroup_serial) {
    std::memset(address, 0xFF, bytes);
    variable->poisoned_in = state.threadgroup_serial;
  }
}

inline void yield_to_scheduler() {
  Runtime& state = runtime();
  switch_fiber(state.current_fiber->context, state.scheduler_context);
}

// Ends the launch from inside a thread: the scheduler sees `failed`.
template <class... Arguments>
[[noreturn]] void fail_thread(const char* format, Arguments... arguments) {
  report(format, arguments...);
  yield_to_scheduler();
  __builtin_unreachable();
}

#define MLX_FM_THREAD_FORMAT "thread (%u, %u, %u) of threadgroup (%u, %u, %u)"
#define MLX_FM_THREAD_ARGUMENTS(a)                                                             \
  (a).thread_position_in_threadgroup.x, (a).thread_position_in_threadgroup.y,                  \
      (a).thread_position_in_threadgroup.z, (a).threadgroup_position_in_grid.x,                \
      (a).threadgroup_position_in_grid.y, (a).threadgroup_position_in_grid.z

inline void threadgroup_barrier(bool fences_threadgroup, Site site) {
  Fiber& fiber = current_fiber();
  fiber.wait = Wait::barrier;
  fiber.site = site;
  fiber.fences_threadgroup = fences_threadgroup;
  yield_to_scheduler();
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

// The lanes that wait at the same call site when the exchange completes are
// its active lanes (lanes elsewhere are inactive, as in divergent code).
template <class T>
SimdValues<T> simd_exchange(T value, Site site) {
  static_assert(sizeof(T) <= simd_slot_bytes, "SIMD-group function argument is too large");
  Fiber& fiber = current_fiber();
  SimdGroup& group = current_simdgroup();
  uint32_t lane = fiber.attributes.thread_index_in_simdgroup;
  uint8_t parity = group.parity;
  std::memcpy(group.slots[parity][lane], &value, sizeof(T));
  fiber.wait = Wait::simd;
  fiber.site = site;
  fiber.slot_parity = parity;
  yield_to_scheduler();
  SimdValues<T> exchanged;
  exchanged.participants = group.participants[lane];
  exchanged.lane = lane;
  for (int i = 0; i < simd_width; ++i) {
    if (exchanged.participates(i)) std::memcpy(&exchanged.values[i], group.slots[parity][i], sizeof(T));
  }
  return exchanged;
}

inline void simdgroup_barrier(Site site) { simd_exchange<char>(0, site); }

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

// --- faults --------------------------------------------------------------------

// -fsanitize=bounds calls this for an out-of-bounds index into an array
// (private or threadgroup); the layout is GCC's and Clang's UBSan ABI.
namespace ubsan {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct OutOfBoundsData {
  SourceLocation location;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};

inline long long index_value(const TypeDescriptor* type, uintptr_t value) {
  unsigned bits = 1u << (type->info >> 1);
  bool is_signed = type->info & 1;
  if (is_signed && bits < 64) return (long long)(int64_t(value << (64 - bits)) >> (64 - bits));
  return (long long)value;
}
}  // namespace ubsan

inline void on_memory_fault(int signal, siginfo_t* info, void* context) {
  Runtime& state = runtime();
  if (!state.current_fiber) {
    // A fault outside kernel code is the emulator's own: crash as usual.
    ::signal(signal, SIG_DFL);
    return;
  }
  state.fault->address = uintptr_t(info->si_addr);
#if defined(__x86_64__)
  state.fault->is_write = (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
  state.fault->happened = 1;
  const ThreadAttributes& a = state.current_fiber->attributes;
  fail_thread("invalid memory access at address %p by " MLX_FM_THREAD_FORMAT, info->si_addr,
              MLX_FM_THREAD_ARGUMENTS(a));
}

// Catches faults in kernel code for the duration of a launch.
struct FaultHandlers {
  struct sigaction previous_segv, previous_bus;
  stack_t previous_stack;

  FaultHandlers() {
    Runtime& state = runtime();
    if (!state.signal_stack) {
      state.signal_stack = static_cast<char*>(mmap(nullptr, signal_stack_bytes, PROT_READ | PROT_WRITE,
                                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    }
    stack_t stack{};
    stack.ss_sp = state.signal_stack;
    stack.ss_size = signal_stack_bytes;
    sigaltstack(&stack, &previous_stack);
    struct sigaction action {};
    action.sa_sigaction = &on_memory_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
    sigaction(SIGBUS, &action, &previous_bus);
  }
  ~FaultHandlers() {
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    sigaltstack(&previous_stack, nullptr);
  }
};

// --- scheduling ------------------------------------------------------------------

inline uint64_t next_random(uint64_t& state) {  // xorshift64
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

template <class T>
void shuffle(T* items, size_t count, uint64_t& random_state) {
  for (size_t i = count; i > 1; --i) {
    size_t j = size_t(next_random(random_state) % i);
    T swapped = items[i - 1];
    items[i - 1] = items[j];
    items[j] = swapped;
  }
}

// Fills `order` with 0..count-1 in the schedule's order.
template <class T>
void schedule_order(T* order, size_t count) {
  Runtime& state = runtime();
  for (size_t i = 0; i < count; ++i) order[i] = T(state.schedule == 1 ? count - 1 - i : i);
  if (state.schedule >= 2) shuffle(order, count, state.random_state);
}

// Completes the SIMD-group functions the lanes of one SIMD group wait at.
inline bool resolve_simd_functions(Threadgroup& group, int first, int lanes) {
  Fiber* fibers = group.fibers + first;
  SimdGroup& simd = group.simdgroups[first / simd_width];
  uint32_t pending = 0;
  for (int lane = 0; lane < lanes; ++lane) {
    if (fibers[lane].wait == Wait::simd) pending |= 1u << lane;
  }
  for (uint32_t left = pending; left;) {
    int lane = __builtin_ctz(left);
    uint32_t same_site = 0;
    for (uint32_t other = left; other; other &= other - 1) {
      int candidate = __builtin_ctz(other);
      if (fibers[candidate].site == fibers[lane].site) same_site |= 1u << candidate;
    }
    for (uint32_t member = same_site; member; member &= member - 1) {
      simd.participants[__builtin_ctz(member)] = same_site;
    }
    left &= ~same_site;
  }
  for (uint32_t member = pending; member; member &= member - 1) {
    fibers[__builtin_ctz(member)].wait = Wait::ready;
  }
  if (pending) simd.parity ^= 1;
  return pending != 0;
}

// Runs one SIMD group until each of its lanes waits at a barrier or has
// returned: SIMD groups progress independently between barriers.
inline bool run_simdgroup(Threadgroup& group, int first, int lanes) {
  Runtime& state = runtime();
  int order[simd_width];
  do {
    schedule_order(order, size_t(lanes));
    for (int k = 0; k < lanes; ++k) {
      Fiber& fiber = group.fibers[first + order[k]];
      if (fiber.wait != Wait::ready) continue;
      state.current_fiber = &fiber;
      switch_fiber(state.scheduler_context, fiber.context);
      state.current_fiber = nullptr;
      if (state.failed) return false;
    }
  } while (resolve_simd_functions(group, first, lanes));
  return true;
}

// Metal requires every thread of a threadgroup to reach each barrier call,
// the same number of times.
inline bool release_barrier(Threadgroup& group) {
  const Fiber* first = nullptr;
  for (int i = 0; i < group.thread_count && !first; ++i) {
    if (group.fibers[i].wait == Wait::barrier) first = &group.fibers[i];
  }
  const ThreadAttributes& a = first->attributes;
  if (group.finished_threads > 0) {
    report("threadgroup_barrier at %s:%d is reached by %d threads of threadgroup (%u, %u, %u) while %d "
           "returned without reaching it (every thread of a threadgroup must reach each barrier)",
           first->site.file, first->site.line, group.thread_count - group.finished_threads,
           a.threadgroup_position_in_grid.x, a.threadgroup_position_in_grid.y,
           a.threadgroup_position_in_grid.z, group.finished_threads);
    return false;
  }
  for (int i = 0; i < group.thread_count; ++i) {
    const Fiber& fiber = group.fibers[i];
    if (!(fiber.site == first->site)) {
      report("divergent threadgroup_barrier: " MLX_FM_THREAD_FORMAT " waits at %s:%d, thread index %d at "
             "%s:%d (all threads of a threadgroup must reach the same barrier the same number of times)",
             MLX_FM_THREAD_ARGUMENTS(a), first->site.file, first->site.line, i, fiber.site.file,
             fiber.site.line);
      return false;
    }
    if (!fiber.fences_threadgroup && threadgroup_memory_bytes() > 0) {
      report("threadgroup_barrier at %s:%d without mem_flags::mem_threadgroup in a kernel with threadgroup "
             "memory: it does not make threadgroup memory writes visible to the other threads",
             fiber.site.file, fiber.site.line);
      return false;
    }
  }
  for (int i = 0; i < group.thread_count; ++i) group.fibers[i].wait = Wait::ready;
  return true;
}

inline bool run_threadgroup(Threadgroup& group) {
  int simdgroup_count = (group.thread_count + simd_width - 1) / simd_width;
  while (group.finished_threads < group.thread_count) {
    schedule_order(group.order, size_t(simdgroup_count));
    for (int k = 0; k < simdgroup_count; ++k) {
      int first = group.order[k] * simd_width;
      int lanes = group.thread_count - first < simd_width ? group.thread_count - first : simd_width;
      if (!run_simdgroup(group, first, lanes)) return false;
    }
    if (group.finished_threads < group.thread_count && !release_barrier(group)) return false;
  }
  return true;
}

// --- dispatch ----------------------------------------------------------------

inline bool reserve_stacks(size_t count) {
  Runtime& state = runtime();
  if (state.stack_count >= count) return true;
  if (state.stacks) munmap(state.stacks, state.stack_count * fiber_stack_bytes);
  state.stack_count = 0;
  void* memory = mmap(nullptr, count * fiber_stack_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    report("could not map %zu fiber stacks", count);
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
  fiber.wait = Wait::finished;
  ++state.threadgroup.finished_threads;
  switch_fiber(fiber.context, state.scheduler_context);
}

inline void start_threadgroup(Threadgroup& group, int thread_count) {
  Runtime& state = runtime();
  group.thread_count = thread_count;
  group.finished_threads = 0;
  for (int s = 0; s < (thread_count + simd_width - 1) / simd_width; ++s) group.simdgroups[s].parity = 0;
  for (int i = 0; i < thread_count; ++i) {
    Fiber& fiber = group.fibers[i];
    fiber.wait = Wait::ready;
    prepare_fiber(fiber.context, state.stacks + i * fiber_stack_bytes, fiber_stack_bytes);
  }
  ++state.threadgroup_serial;
}

inline uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// Runs the grid as Metal's dispatchThreads does: `grid` counts threads and
// threadgroups at the upper edges are cut to the grid (their
// threads_per_threadgroup is the smaller, actual size). Threadgroups run one
// at a time, in the schedule's order.
inline bool dispatch(const uint32_t* grid, const uint32_t* threadgroup_size) {
  Runtime& state = runtime();
  metal::uint3 grid_size(grid[0], grid[1], grid[2]);
  metal::uint3 dispatch_size(threadgroup_size[0], threadgroup_size[1], threadgroup_size[2]);
  metal::uint3 group_count(ceil_div(grid[0], threadgroup_size[0]), ceil_div(grid[1], threadgroup_size[1]),
                           ceil_div(grid[2], threadgroup_size[2]));
  uint32_t dispatch_threads = dispatch_size.x * dispatch_size.y * dispatch_size.z;
  if (!reserve_stacks(dispatch_threads)) return false;

  ThreadAttributes a{};
  a.threads_per_grid = grid_size;
  a.threadgroups_per_grid = group_count;
  a.dispatch_threads_per_threadgroup = dispatch_size;
  a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatch_threads, simd_width);
  a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatch_threads, 4);
  a.threads_per_simdgroup = simd_width;
  a.grid_origin = metal::uint3(0u);
  Threadgroup& group = state.threadgroup;
  size_t total_groups = size_t(group_count.x) * group_count.y * group_count.z;
  uint32_t* group_order = new uint32_t[total_groups];
  schedule_order(group_order, total_groups);
  bool succeeded = true;
  for (size_t k = 0; k < total_groups && succeeded; ++k) {
    uint32_t linear = group_order[k];
    uint32_t gx = linear % group_count.x, gy = (linear / group_count.x) % group_count.y,
             gz = linear / (group_count.x * group_count.y);
    metal::uint3 origin(gx * dispatch_size.x, gy * dispatch_size.y, gz * dispatch_size.z);
    metal::uint3 size = metal::min(dispatch_size, grid_size - origin);
    uint32_t thread_count = size.x * size.y * size.z;
    a.threadgroup_position_in_grid = metal::uint3(gx, gy, gz);
    a.threads_per_threadgroup = size;
    a.simdgroups_per_threadgroup = ceil_div(thread_count, simd_width);
    a.quadgroups_per_threadgroup = ceil_div(thread_count, 4);
    start_threadgroup(group, int(thread_count));
    for (uint32_t index = 0; index < thread_count; ++index) {
      metal::uint3 local(index % size.x, (index / size.x) % size.y, index / (size.x * size.y));
      a.thread_position_in_threadgroup = local;
      a.thread_position_in_grid = origin + local;
      a.thread_index_in_threadgroup = index;
      a.thread_index_in_simdgroup = index % simd_width;
      a.simdgroup_index_in_threadgroup = index / simd_width;
      a.thread_index_in_quadgroup = index % 4;
      a.quadgroup_index_in_threadgroup = index / 4;
      group.fibers[index].attributes = a;
    }
    succeeded = run_threadgroup(group);
  }
  delete[] group_order;
  return succeeded;
}

inline int launch(const uint32_t* grid, const uint32_t* threadgroup_size, int schedule, KernelInvoker invoke,
                  void* kernel, char* error, size_t error_size, Fault* fault) {
  Runtime& state = runtime();
  state.invoke = invoke;
  state.kernel = kernel;
  state.schedule = schedule;
  state.random_state = 0x9E3779B97F4A7C15ull * uint64_t(schedule + 1);
  state.failed = false;
  state.error = error;
  state.error_size = error_size;
  state.fault = fault;
  FaultHandlers handlers;
  return dispatch(grid, threadgroup_size) ? 0 : 1;
}

}  // namespace mlx_fm_emulator

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(
    mlx_fm_emulator::ubsan::OutOfBoundsData* data, uintptr_t index) {
  const mlx_fm_emulator::ThreadAttributes& a = mlx_fm_emulator::current_fiber().attributes;
  mlx_fm_emulator::fail_thread("index %lld out of bounds for type %s at %s:%u by " MLX_FM_THREAD_FORMAT,
                               mlx_fm_emulator::ubsan::index_value(data->index_type, index),
                               data->array_type->name, data->location.file, data->location.line,
                               MLX_FM_THREAD_ARGUMENTS(a));
}

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

using mlx_fm_emulator::Site;

// Threads switch only at these calls, so memory is always ordered across
// them; a barrier without mem_threadgroup is refused in a kernel with
// threadgroup memory instead (see release_barrier).
inline void threadgroup_barrier(mem_flags flags, Site site = Site()) {
  bool fences_threadgroup = (uint32_t(flags) & uint32_t(mem_flags::mem_threadgroup)) != 0;
  mlx_fm_emulator::threadgroup_barrier(fences_threadgroup, site);
}
inline void simdgroup_barrier(mem_flags, Site site = Site()) { mlx_fm_emulator::simdgroup_barrier(site); }

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

template <class T>
struct scalar_of {
  using type = T;
};
template <class T, int N>
struct scalar_of<vec<T, N>> {
  using type = T;
};

// Metal's SIMD-group reductions and scans take 8-, 16- and 32-bit types only.
template <class T>
constexpr void check_reduction_type() {
  static_assert(sizeof(typename scalar_of<T>::type) <= 4 && !std::is_same_v<typename scalar_of<T>::type, double>,
                "Metal SIMD-group reductions take 8-, 16- or 32-bit types (no long, ulong or double)");
}

template <class T, class Op>
T group_reduce(T value, uint32_t width, T identity, Op op, Site site) {
  check_reduction_type<T>();
  SimdValues<T> exchanged = simd_exchange(value, site);
  return mlx_fm_emulator::tree_reduce(exchanged, group_base(exchanged, width), width, identity, op);
}

// For max, min, and, or: absent lanes may repeat any present value.
template <class T, class Op>
T group_reduce_idempotent(T value, uint32_t width, Op op, Site site) {
  check_reduction_type<T>();
  SimdValues<T> exchanged = simd_exchange(value, site);
  return mlx_fm_emulator::tree_reduce(exchanged, group_base(exchanged, width), width, value, op);
}

template <class T, class Op>
T group_prefix(T value, uint32_t width, uint32_t inclusive, T identity, Op op, Site site) {
  check_reduction_type<T>();
  SimdValues<T> exchanged = simd_exchange(value, site);
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
  template <class T> T prefix##_sum(T x, Site site = Site()) {                                                    \
    return simd_detail::group_reduce(x, width, T(0), simd_detail::add, site);                       \
  }                                                                                           \
  template <class T> T prefix##_product(T x, Site site = Site()) {                                                \
    return simd_detail::group_reduce(x, width, T(1), simd_detail::multiply, site);                  \
  }                                                                                           \
  template <class T> T prefix##_max(T x, Site site = Site()) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::maximum, site);              \
  }                                                                                           \
  template <class T> T prefix##_min(T x, Site site = Site()) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::minimum, site);              \
  }                                                                                           \
  template <class T> T prefix##_and(T x, Site site = Site()) {                                                    \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::bit_and, site);              \
  }                                                                                           \
  template <class T> T prefix##_or(T x, Site site = Site()) {                                                     \
    return simd_detail::group_reduce_idempotent(x, width, simd_detail::bit_or, site);               \
  }                                                                                           \
  template <class T> T prefix##_xor(T x, Site site = Site()) {                                                    \
    return simd_detail::group_reduce(x, width, T(0), simd_detail::bit_xor, site);                   \
  }                                                                                           \
  template <class T> T prefix##_shuffle(T x, ushort lane, Site site = Site()) {                                   \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + lane % (width)); \
  }                                                                                           \
  template <class T> T prefix##_broadcast(T x, ushort lane, Site site = Site()) { return prefix##_shuffle(x, lane, site); } \
  template <class T> T prefix##_shuffle_xor(T x, ushort mask, Site site = Site()) {                               \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    return simd_detail::value_of_lane(exchanged, exchanged.lane ^ (mask & ((width) - 1u)));   \
  }                                                                                           \
  template <class T> T prefix##_shuffle_up(T x, ushort delta, Site site = Site()) {                               \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    if (exchanged.lane % (width) < delta) return x;                                           \
    return simd_detail::value_of_lane(exchanged, exchanged.lane - delta);                     \
  }                                                                                           \
  template <class T> T prefix##_shuffle_down(T x, ushort delta, Site site = Site()) {                             \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    if (exchanged.lane % (width) + delta >= (width)) return x;                                \
    return simd_detail::value_of_lane(exchanged, exchanged.lane + delta);                     \
  }                                                                                           \
  template <class T> T prefix##_shuffle_rotate_up(T x, ushort delta, Site site = Site()) {                        \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    uint32_t position = (exchanged.lane + (width) - delta % (width)) % (width);               \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + position); \
  }                                                                                           \
  template <class T> T prefix##_shuffle_rotate_down(T x, ushort delta, Site site = Site()) {                      \
    auto exchanged = simd_detail::simd_exchange(x, site);                                           \
    uint32_t position = (exchanged.lane + delta) % (width);                                   \
    return simd_detail::value_of_lane(exchanged, simd_detail::group_base(exchanged, width) + position); \
  }                                                                                           \
  template <class T> T prefix##_prefix_inclusive_sum(T x, Site site = Site()) {                                   \
    return simd_detail::group_prefix(x, width, 1, T(0), simd_detail::add, site);                    \
  }                                                                                           \
  template <class T> T prefix##_prefix_exclusive_sum(T x, Site site = Site()) {                                   \
    return simd_detail::group_prefix(x, width, 0, T(0), simd_detail::add, site);                    \
  }                                                                                           \
  template <class T> T prefix##_prefix_inclusive_product(T x, Site site = Site()) {                               \
    return simd_detail::group_prefix(x, width, 1, T(1), simd_detail::multiply, site);               \
  }                                                                                           \
  template <class T> T prefix##_prefix_exclusive_product(T x, Site site = Site()) {                               \
    return simd_detail::group_prefix(x, width, 0, T(1), simd_detail::multiply, site);               \
  }                                                                                           \
  inline bool prefix##_all(bool predicate, Site site = Site()) {                                                  \
    return simd_detail::group_reduce_idempotent(predicate, width, simd_detail::logical_and, site);  \
  }                                                                                           \
  inline bool prefix##_any(bool predicate, Site site = Site()) {                                                  \
    return simd_detail::group_reduce_idempotent(predicate, width, simd_detail::logical_or, site);   \
  }

MLX_FM_GROUP_FUNCTIONS(simd, 32u)
MLX_FM_GROUP_FUNCTIONS(quad, 4u)
#undef MLX_FM_GROUP_FUNCTIONS

namespace simd_detail {
template <class T>
struct DataAndFilling {
  T data;
  T filling;
};

// Lane l of each group of `width` lanes reads the data of the lane `shift`
// places above it (below, for a negative shift) in its group, or past the
// group's end the filling of the lane as far into the group from its other end.
template <class T>
T shuffle_and_fill(T data, T filling, int shift, uint32_t width, Site site) {
  auto exchanged = simd_exchange(DataAndFilling<T>{data, filling}, site);
  uint32_t base = exchanged.lane - exchanged.lane % width;
  int position = int(exchanged.lane % width) + shift;
  bool filled = position < 0 || position >= int(width);
  uint32_t source = base + uint32_t((position + int(width)) % int(width));
  if (source >= uint32_t(simd_width) || !exchanged.participates(source)) return data;
  return filled ? exchanged.values[source].filling : exchanged.values[source].data;
}
}  // namespace simd_detail

template <class T>
T simd_shuffle_and_fill_down(T data, T filling, ushort delta, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, int(delta), 32u, site);
}
template <class T>
T simd_shuffle_and_fill_down(T data, T filling, ushort delta, ushort modulo, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, int(delta), modulo, site);
}
template <class T>
T simd_shuffle_and_fill_up(T data, T filling, ushort delta, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, -int(delta), 32u, site);
}
template <class T>
T simd_shuffle_and_fill_up(T data, T filling, ushort delta, ushort modulo, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, -int(delta), modulo, site);
}
template <class T>
T quad_shuffle_and_fill_down(T data, T filling, ushort delta, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, int(delta), 4u, site);
}
template <class T>
T quad_shuffle_and_fill_up(T data, T filling, ushort delta, Site site = Site()) {
  return simd_detail::shuffle_and_fill(data, filling, -int(delta), 4u, site);
}

// Compute kernels have no helper threads (they exist in fragment functions).
inline bool simd_is_helper_thread() { return false; }
inline bool quad_is_helper_thread() { return false; }

template <class T>
T simd_broadcast_first(T x, Site site = Site()) {
  auto exchanged = simd_detail::simd_exchange(x, site);
  return exchanged.values[exchanged.first_lane()];
}

inline bool simd_is_first(Site site = Site()) {
  auto exchanged = simd_detail::simd_exchange(false, site);
  return exchanged.lane == exchanged.first_lane();
}

// Lanes whose predicate is true, as the bits of a 64-bit mask.
struct simd_vote {
  uint64_t mask;
  explicit operator uint64_t() const { return mask; }
  bool any() const { return mask != 0; }
};

inline simd_vote simd_ballot(bool predicate, Site site = Site()) {
  auto exchanged = simd_detail::simd_exchange(predicate, site);
  uint64_t mask = 0;
  for (int i = 0; i < simd_detail::simd_width; ++i) {
    if (exchanged.participates(i) && exchanged.values[i]) mask |= uint64_t(1) << i;
  }
  return simd_vote{mask};
}

inline simd_vote simd_active_threads_mask(Site site = Site()) { return simd_ballot(true, site); }

// simdgroup_matrix: an 8x8 matrix spread over the 32 lanes of a SIMD group,
// lane l holding the elements 2l and 2l + 1 in row-major order (Apple's layout
// differs; kernels could see it only through thread_elements(), not provided).
// Loads, stores and products are SIMD-group functions: every lane of the SIMD
// group must call them together, loads and stores with the same arguments, and
// each lane computes its own elements from what the others pass.
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulator supports 8x8 simdgroup matrices only");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>,
                "simdgroup_matrix holds float, half or bfloat");
  T elements[2];

  simdgroup_matrix() = default;
  // A diagonal matrix, as Metal's constructor from one value.
  explicit simdgroup_matrix(T diagonal) {
    uint32_t lane = mlx_fm_emulator::current_fiber().attributes.thread_index_in_simdgroup;
    for (int k = 0; k < 2; ++k) {
      uint32_t index = 2 * lane + k;
      elements[k] = index / 8 == index % 8 ? diagonal : T(0);
    }
  }
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

template <class T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> filled;
  filled.elements[0] = filled.elements[1] = value;
  return filled;
}

namespace simdgroup_matrix_detail {
using mlx_fm_emulator::fail_thread;
using mlx_fm_emulator::SimdValues;

// Where a load reads or a store writes, as every lane must pass it: the
// address of the matrix's origin, the source's row length, the transposition.
struct Access {
  const void* origin;
  ulong elements_per_row;
  bool transpose;

  bool operator==(const Access& other) const {
    return origin == other.origin && elements_per_row == other.elements_per_row && transpose == other.transpose;
  }
};

// Exchanges `value` among the lanes; fails unless every lane of the SIMD group takes part.
template <class V>
SimdValues<V> collective(V value, const char* function, Site site) {
  SimdValues<V> exchanged = simd_detail::simd_exchange(value, site);
  const auto& a = mlx_fm_emulator::current_fiber().attributes;
  uint32_t first = a.simdgroup_index_in_threadgroup * 32;
  uint32_t lanes = mlx_fm_emulator::runtime().threadgroup.thread_count - first;
  uint32_t all = lanes >= 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  if (exchanged.participants != all) {
    fail_thread("%s at %s:%d is called by lanes 0x%08x of SIMD group %u, whose lanes are 0x%08x (simdgroup_matrix "
                "functions need every lane of the SIMD group)",
                function, site.file, site.line, exchanged.participants, a.simdgroup_index_in_threadgroup, all);
  }
  return exchanged;
}

inline void check_uniform(const SimdValues<Access>& exchanged, const char* function, Site site) {
  for (uint32_t lane = 0; lane < 32; ++lane) {
    if (exchanged.participates(lane) && !(exchanged.values[lane] == exchanged.values[exchanged.first_lane()])) {
      fail_thread("%s at %s:%d: lanes %u and %u pass different pointers, strides, origins or transposition "
                  "(a simdgroup_matrix load or store takes one matrix for the whole SIMD group)",
                  function, site.file, site.line, exchanged.first_lane(), lane);
    }
  }
}

// The offset of element (row, column) of the matrix from its origin.
inline ulong offset(const Access& access, uint32_t row, uint32_t column) {
  return access.transpose ? column * access.elements_per_row + row : row * access.elements_per_row + column;
}

template <class T>
Access access_of(const T* pointer, ulong elements_per_row, ulong2 origin, bool transpose) {
  return Access{pointer + origin.y * elements_per_row + origin.x, elements_per_row, transpose};
}

// Every lane's two elements of a and b, gathered by all the lanes.
template <class T>
struct Operands {
  T a[2];
  T b[2];
};

template <class T, int Cols, int Rows>
void multiply_into(simdgroup_matrix<T, Cols, Rows>& d, const simdgroup_matrix<T, Cols, Rows>& a,
                   const simdgroup_matrix<T, Cols, Rows>& b, const simdgroup_matrix<T, Cols, Rows>* c,
                   const char* function, Site site) {
  Operands<T> mine{{a.elements[0], a.elements[1]}, {b.elements[0], b.elements[1]}};
  SimdValues<Operands<T>> exchanged = collective(mine, function, site);
  auto element = [&](bool of_a, uint32_t index) {
    const Operands<T>& owner = exchanged.values[index / 2];
    return float(of_a ? owner.a[index % 2] : owner.b[index % 2]);
  };
  T result[2];
  for (int k = 0; k < 2; ++k) {
    uint32_t index = 2 * exchanged.lane + k;
    uint32_t row = index / 8, column = index % 8;
    float sum = c ? float(c->elements[k]) : 0.0f;
    for (uint32_t inner = 0; inner < 8; ++inner) sum += element(true, row * 8 + inner) * element(false, inner * 8 + column);
    result[k] = T(sum);
  }
  d.elements[0] = result[0];
  d.elements[1] = result[1];
}
}  // namespace simdgroup_matrix_detail

template <class T, int Cols, int Rows>
void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const T* source, ulong elements_per_row = Cols,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false, Site site = Site()) {
  using namespace simdgroup_matrix_detail;
  Access access = access_of(source, elements_per_row, matrix_origin, transpose_matrix);
  SimdValues<Access> exchanged = collective(access, "simdgroup_load", site);
  check_uniform(exchanged, "simdgroup_load", site);
  for (int k = 0; k < 2; ++k) {
    uint32_t index = 2 * exchanged.lane + k;
    d.elements[k] = static_cast<const T*>(access.origin)[offset(access, index / 8, index % 8)];
  }
}

template <class T, int Cols, int Rows>
void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& matrix, T* destination, ulong elements_per_row = Cols,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false, Site site = Site()) {
  using namespace simdgroup_matrix_detail;
  Access access = access_of<T>(destination, elements_per_row, matrix_origin, transpose_matrix);
  SimdValues<Access> exchanged = collective(access, "simdgroup_store", site);
  check_uniform(exchanged, "simdgroup_store", site);
  for (int k = 0; k < 2; ++k) {
    uint32_t index = 2 * exchanged.lane + k;
    const_cast<T*>(static_cast<const T*>(access.origin))[offset(access, index / 8, index % 8)] = matrix.elements[k];
  }
}

// d = a · b + c, accumulated in float.
template <class T, int Cols, int Rows>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, Cols, Rows>& d,
                                   const simdgroup_matrix<T, Cols, Rows>& a,
                                   const simdgroup_matrix<T, Cols, Rows>& b,
                                   const simdgroup_matrix<T, Cols, Rows>& c, Site site = Site()) {
  simdgroup_matrix_detail::multiply_into(d, a, b, &c, "simdgroup_multiply_accumulate", site);
}

template <class T, int Cols, int Rows>
void simdgroup_multiply(simdgroup_matrix<T, Cols, Rows>& d, const simdgroup_matrix<T, Cols, Rows>& a,
                        const simdgroup_matrix<T, Cols, Rows>& b, Site site = Site()) {
  simdgroup_matrix_detail::multiply_into<T, Cols, Rows>(d, a, b, nullptr, "simdgroup_multiply", site);
}

// Atomics: atomic<T> has the layout of T; operations use the compiler's
// atomic built-ins (floating-point read-modify-write by compare-exchange).
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst
};
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };

// Threads switch only at barriers and SIMD-group functions, so a fence has
// nothing left to order.
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {}

template <class T>
struct atomic {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, uint> || std::is_same_v<T, bool> ||
                    std::is_same_v<T, float> || std::is_same_v<T, ulong>,
                "Metal atomics hold int, uint, bool, float or ulong");
  T value;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_bool = atomic<bool>;
using atomic_float = atomic<float>;
using atomic_ulong = atomic<ulong>;

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

// 64-bit atomic max and min, which return nothing.
inline void atomic_max_explicit(volatile atomic<ulong>* object, ulong operand, memory_order order) {
  atomic_fetch_max_explicit(object, operand, order);
}
inline void atomic_min_explicit(volatile atomic<ulong>* object, ulong operand, memory_order order) {
  atomic_fetch_min_explicit(object, operand, order);
}
template <class T>
void atomic_init(volatile atomic<T>* object, T value) { atomic_store_explicit(object, value, memory_order_relaxed); }

// ---------------------------------------------------------------------------
// MLX's prelude: what mlx/backend/metal/kernels/utils.h (with bf16.h,
// bf16_math.h, complex.h, defines.h and logging.h) gives every custom kernel.
// `constant` buffers are volatile in the emulator (see metal_kernel.py), so
// shapes and strides are taken as volatile pointers.

inline uint16_t bfloat16_to_uint16(bfloat16_t x) { return as_type<uint16_t>(x); }
inline bfloat16_t uint16_to_bfloat16(uint16_t x) { return as_type<bfloat16_t>(x); }

template <class U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <bool Condition, class T, class U>
struct ConditionalType {
  using type = U;
};
template <class T, class U>
struct ConditionalType<true, T, U> {
  using type = T;
};

// complex_t: MLX's complex numbers (real and imag), with its arithmetic and
// its conversions from and to scalars (the real part) and two-lane vectors.
template <class T>
struct complex_t;
template <class T>
constexpr bool is_complex_v = false;
template <class T>
constexpr bool is_complex_v<complex_t<T>> = true;
template <class U>
constexpr bool is_scalar_number_v = std::is_arithmetic_v<U> || is_small_float<U>::value;
template <class From, class To>
constexpr bool is_lane_convertible_v = is_scalar_number_v<From> && is_scalar_number_v<To>;

template <class T>
struct complex_t {
  using value_type = T;
  T real;
  T imag;

  constexpr complex_t(T real, T imag) : real(real), imag(imag) {}
  constexpr complex_t() : real(0), imag(0) {}
  template <class U, std::enable_if_t<is_scalar_number_v<U>, int> = 0>
  constexpr complex_t(U x) : real(static_cast<T>(x)), imag(static_cast<T>(0)) {}
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  constexpr complex_t(complex_t<U> x) : real(static_cast<T>(x.real)), imag(static_cast<T>(x.imag)) {}
  complex_t(vec<T, 2> v) : real(v.x), imag(v.y) {}
  operator vec<T, 2>() const { return vec<T, 2>(real, imag); }
  template <class U, std::enable_if_t<is_scalar_number_v<U>, int> = 0>
  constexpr operator U() const { return static_cast<U>(real); }
};
using complex32_t = complex_t<half>;
using complex64_t = complex_t<float>;

template <class T>
complex_t<T> operator-(complex_t<T> x) { return {-x.real, -x.imag}; }
template <class T>
bool operator==(complex_t<T> a, complex_t<T> b) { return a.real == b.real && a.imag == b.imag; }
template <class T>
bool operator>(complex_t<T> a, complex_t<T> b) { return a.real > b.real || (a.real == b.real && a.imag > b.imag); }
template <class T>
bool operator>=(complex_t<T> a, complex_t<T> b) { return a.real > b.real || (a.real == b.real && a.imag >= b.imag); }
template <class T>
bool operator<(complex_t<T> a, complex_t<T> b) { return b > a; }
template <class T>
bool operator<=(complex_t<T> a, complex_t<T> b) { return b >= a; }
template <class T>
complex_t<T> operator+(complex_t<T> a, complex_t<T> b) { return {T(a.real + b.real), T(a.imag + b.imag)}; }
template <class T>
complex_t<T> operator-(complex_t<T> a, complex_t<T> b) { return {T(a.real - b.real), T(a.imag - b.imag)}; }
template <class T>
complex_t<T> operator*(complex_t<T> a, complex_t<T> b) {
  return {T(a.real * b.real - a.imag * b.imag), T(a.real * b.imag + a.imag * b.real)};
}
template <class T>
complex_t<T> operator/(complex_t<T> a, complex_t<T> b) {
  float ar = a.real, ai = a.imag, br = b.real, bi = b.imag;
  if (std::fabs(br) >= std::fabs(bi)) {
    float ratio = bi / br, denominator = br + bi * ratio;
    return {T((ar + ai * ratio) / denominator), T((ai - ar * ratio) / denominator)};
  }
  float ratio = br / bi, denominator = bi + br * ratio;
  return {T((ar * ratio + ai) / denominator), T((ai * ratio - ar) / denominator)};
}
template <class T>
complex_t<T>& operator+=(complex_t<T>& a, complex_t<T> b) { return a = a + b; }
#define MLX_FM_COMPLEX_WITH_SCALAR(op)                                                                  \
  template <class T, class U, std::enable_if_t<is_scalar_number_v<U>, int> = 0>                       \
  complex_t<T> operator op(U a, complex_t<T> b) { return complex_t<T>(a) op b; }                      \
  template <class T, class U, std::enable_if_t<is_scalar_number_v<U>, int> = 0>                       \
  complex_t<T> operator op(complex_t<T> a, U b) { return a op complex_t<T>(b); }
MLX_FM_COMPLEX_WITH_SCALAR(+)
MLX_FM_COMPLEX_WITH_SCALAR(-)
MLX_FM_COMPLEX_WITH_SCALAR(*)
MLX_FM_COMPLEX_WITH_SCALAR(/)
#undef MLX_FM_COMPLEX_WITH_SCALAR

template <class U>
struct Limits {
  static constexpr U max = std::numeric_limits<U>::max();
  static constexpr U min = std::numeric_limits<U>::min();
  static constexpr U finite_max = std::numeric_limits<U>::max();
  static constexpr U finite_min = std::numeric_limits<U>::min();
};
template <class U>
struct FloatLimits {
  static inline const U max = numeric_limits<U>::infinity();
  static inline const U min = -numeric_limits<U>::infinity();
  static inline const U finite_max = numeric_limits<U>::max();
  static inline const U finite_min = -numeric_limits<U>::max();
};
template <>
struct Limits<float> : FloatLimits<float> {};
template <>
struct Limits<half> : FloatLimits<half> {};
template <>
struct Limits<bfloat> : FloatLimits<bfloat> {};
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};
template <class T>
struct Limits<complex_t<T>> {
  static inline const complex_t<T> max{numeric_limits<T>::infinity(), numeric_limits<T>::infinity()};
  static inline const complex_t<T> min{-numeric_limits<T>::infinity(), -numeric_limits<T>::infinity()};
};

template <class T, class U>
inline T ceildiv(T n, U d) { return (n + d - 1) / d; }

// https://docs.oracle.com/cd/E19957-01/806-3568/ncg_goldberg.html, as MLX computes it.
inline float log1p(float x) {
  float xp1 = 1.0f + x;
  if (xp1 == Limits<float>::max) return Limits<float>::max;
  if (xp1 == 1.0f) return x;
  return x * (log(xp1) / (xp1 - 1.0f));
}
inline bfloat16_t log1p(bfloat16_t x) {
  float xp1 = 1.0f + float(x);
  if (xp1 == Limits<float>::max) return Limits<bfloat16_t>::max;
  if (xp1 == 1.0f) return x;
  return bfloat16_t(x * (log(xp1) / (xp1 - 1.0f)));
}
inline complex64_t log1p(complex64_t z) {
  float x = z.real, y = z.imag;
  float magnitude = sqrt(x * x + y * y);
  float theta = atan2(y, x + 1);
  if (magnitude < 0.5f) {
    float r = x * (2 + x) + y * y;
    if (r == 0) return {x, theta};
    return {0.5f * log1p(r), theta};
  }
  return {log(sqrt((x + 1) * (x + 1) + y * y)), theta};
}

inline float hypot(float x, float y) {
  if (isinf(x) || isinf(y)) return numeric_limits<float>::infinity();
  if (isnan(x) || isnan(y)) return numeric_limits<float>::quiet_NaN();
  float a = fmax(fabs(x), fabs(y)), b = fmin(fabs(x), fabs(y));
  if (a == 0.0f) return 0.0f;
  float r = (b / a) * (b / a);
  float root = sqrt(1.0f + r);
  if (a == b) return sqrt(2.0f) * a;
  return root == 1.0f && r > 0.0f ? a + a * r / 2.0f : a * root;
}

template <class U, class T>
inline U cast_to(T value) { return static_cast<U>(value); }
template <>
inline bool cast_to<bool, float>(float value) { return (as_type<uint32_t>(value) & 0x7FFFFFFF) != 0; }
template <>
inline bool cast_to<bool, bfloat16_t>(bfloat16_t value) { return (as_type<uint16_t>(value) & 0x7FFF) != 0; }
template <>
inline bool cast_to<bool, complex64_t>(complex64_t value) {
  return cast_to<bool, float>(value.real) || cast_to<bool, float>(value.imag);
}

// Indexing: the offset of an element of an array from its index (elem) in
// row-major order and the array's shape and strides.
template <class IdxT = int64_t>
IdxT elem_to_loc(IdxT elem, const volatile int* shape, const volatile int64_t* strides, int ndim) {
  IdxT location = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    location += IdxT(elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return location;
}
template <class IdxT = int64_t>
IdxT elem_to_loc(uint3 elem, const volatile int* shape, const volatile int64_t* strides, int ndim) {
  IdxT location = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    location += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return location;
}
template <class IdxT = int64_t>
IdxT elem_to_loc_1(uint elem, const volatile int64_t& stride) { return elem * IdxT(stride); }
template <class IdxT = int64_t>
IdxT elem_to_loc_2(uint2 elem, const volatile int64_t strides[2]) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <class IdxT = int64_t>
IdxT elem_to_loc_3(uint3 elem, const volatile int64_t strides[3]) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}
// The offsets of the same element in N arrays of one shape.
template <class IdxT, int N>
vec<IdxT, N> elem_to_locs(uint3 elem, const volatile int* shape, const volatile int64_t* const (&strides)[N],
                          int ndim) {
  vec<IdxT, N> location;
  for (int k = 0; k < N; ++k) {
    location[k] = IdxT(elem.x * IdxT(strides[k][ndim - 1])) + IdxT(elem.y * IdxT(strides[k][ndim - 2]));
  }
  for (int d = ndim - 3; d >= 0; --d) {
    uint position = elem.z % shape[d];
    for (int k = 0; k < N; ++k) location[k] += position * IdxT(strides[k][d]);
    elem.z /= shape[d];
  }
  return location;
}
template <class IdxT = int64_t>
vec<IdxT, 2> elem_to_loc_2_nd(uint3 elem, const volatile int* shape, const volatile int64_t* a_strides,
                              const volatile int64_t* b_strides, int ndim) {
  return elem_to_locs<IdxT, 2>(elem, shape, {a_strides, b_strides}, ndim);
}
template <class IdxT = int64_t>
vec<IdxT, 3> elem_to_loc_3_nd(uint3 elem, const volatile int* shape, const volatile int64_t* a_strides,
                              const volatile int64_t* b_strides, const volatile int64_t* c_strides, int ndim) {
  return elem_to_locs<IdxT, 3>(elem, shape, {a_strides, b_strides, c_strides}, ndim);
}

// Walks the offsets of consecutive elements: next() steps by one element
// (or n), location() is the current offset.
template <int DIM, class OffsetT = size_t, bool General = true>
struct LoopedElemToLoc {
  int dim;
  LoopedElemToLoc<DIM - 1, OffsetT, General> inner_looper;
  OffsetT offset{0};
  int index{0};

  LoopedElemToLoc(int dim) : dim(dim), inner_looper(dim - 1) {}

  void next(const volatile int* shape, const volatile int64_t* strides) {
    if (dim == 0) return;
    index++;
    offset += OffsetT(strides[dim - 1]);
    if (index >= shape[dim - 1]) {
      index = 0;
      inner_looper.next(shape, strides);
      offset = inner_looper.offset;
    }
  }
  void next(int n, const volatile int* shape, const volatile int64_t* strides) {
    if (dim == 0) return;
    index += n;
    offset += n * OffsetT(strides[dim - 1]);
    if (index >= shape[dim - 1]) {
      int extra = index - shape[dim - 1];
      if (extra >= shape[dim - 1]) {
        inner_looper.next(1 + extra / shape[dim - 1], shape, strides);
        extra = extra % shape[dim - 1];
      } else {
        inner_looper.next(shape, strides);
      }
      index = 0;
      offset = inner_looper.offset;
      if (extra > 0) next(extra, shape, strides);
    }
  }
  OffsetT location() { return offset; }
};
template <class OffsetT>
struct LoopedElemToLoc<1, OffsetT, true> {
  int dim;
  OffsetT offset{0};
  uint index{0};

  LoopedElemToLoc(int dim) : dim(dim) {}

  void next(const volatile int* shape, const volatile int64_t* strides) { next(1, shape, strides); }
  void next(int n, const volatile int* shape, const volatile int64_t* strides) {
    index += n;
    offset = dim > 1 ? elem_to_loc<OffsetT>(OffsetT(index), shape, strides, dim) : index * OffsetT(strides[0]);
  }
  OffsetT location() { return offset; }
};
template <class OffsetT>
struct LoopedElemToLoc<1, OffsetT, false> {
  OffsetT offset{0};

  LoopedElemToLoc(int) {}

  void next(const volatile int*, const volatile int64_t* strides) { offset += OffsetT(strides[0]); }
  void next(int n, const volatile int*, const volatile int64_t* strides) { offset += n * OffsetT(strides[0]); }
  OffsetT location() { return offset; }
};

// Which tile of BM rows, among groups of rows that start at `offsets`, a
// SIMD group works on (MLX's gather_mm scheduling).
template <int BM>
bool schedule_row_tile(const int32_t* offsets, const int num_groups, const int M, const int tile,
                       const uint simd_lane_id, int& row, int& group, short& rows) {
  int tiles_before = 0;
  for (int e = 0; e < num_groups; e += 32) {
    const int g = e + int(simd_lane_id);
    int start = M, end = M;
    if (g < num_groups) {
      start = offsets[g];
      end = g + 1 < num_groups ? offsets[g + 1] : M;
    }
    const int n = (end - start + BM - 1) / BM;
    const int tiles_through = tiles_before + simd_prefix_inclusive_sum(n);
    const ushort owner_lane = ushort(simd_sum(int(tiles_through <= tile)));
    if (owner_lane < 32) {
      group = e + owner_lane;
      row = simd_shuffle(start, owner_lane) + (tile - simd_shuffle(tiles_through - n, owner_lane)) * BM;
      rows = short(min(BM, simd_shuffle(end, owner_lane) - row));
      return true;
    }
    tiles_before = simd_shuffle(tiles_through, 31);
  }
  return false;
}

constexpr int MAX_REDUCE_SPECIALIZED_DIMS = 4;
constexpr int REDUCE_N_READS = 4;
constexpr int REDUCE_N_WRITES = 4;
constexpr int SOFTMAX_N_READS = 4;
constexpr int RMS_N_READS = 4;
constexpr int RMS_LOOPED_LIMIT = 4096;
constexpr int CROSS_ENTROPY_N_READS = 4;

}  // namespace metal

// MLX's logger, silent where Metal's os_log is unavailable (as here).
namespace mlx {
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... Arguments>
  void log_debug(const char*, Arguments...) const {}
};
}  // namespace mlx

#define MLX_MTL_PRAGMA_UNROLL
#define MTL_CONST constant
#define instantiate_kernel(name, func, ...) template decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

// Address-space qualifiers carry no meaning on the CPU. Declarations of
// threadgroup storage are rewritten by metal_kernel.py before compilation;
// what remains of `threadgroup` qualifies pointers and references.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
