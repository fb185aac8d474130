// sluice/key.hpp — what every keyed sluice component requires of its key type.
//
// What it is for: requeue_queue, key_lock_table, backoff, the write-behind batcher and the
// pipelines all index state by a caller's key. They state that requirement once, with this
// concept, so a key type without a hash (or without equality) is reported in one readable line
// naming the component, instead of pages of errors from inside a hash table.
//
// Requirements (the concept `sluice::hashable_key<Key, Hash, KeyEqual>`):
//   - Key is copy-constructible and destructible (components keep a copy of the key);
//   - Hash is copy-constructible and `hash(key)` returns something convertible to std::size_t;
//   - KeyEqual is copy-constructible and `eq(a, b)` is convertible to bool (for the default
//     std::equal_to<Key>: `a == b` is, since std::equal_to itself accepts any type until used).
// With the defaults (std::hash<Key>, std::equal_to<Key>) that means: give the key a std::hash
// specialisation and an operator==, or pass your own Hash / KeyEqual.
//
// How a component states it (so the message is the *only* error): its class body begins with
//   static_assert(sluice::hashable_key<Key, Hash, KeyEqual>, "sluice::<component>: Key needs ...");
// and it uses detail::checked_hash / detail::checked_key_equal (below) for its members instead of
// Hash / KeyEqual directly. When the concept fails those name a harmless stand-in, so the rest of
// the class still compiles and no cascade of errors from inside a hash table follows the message.
//
// Example:
//   struct uid { std::string value; bool operator==(const uid&) const = default; };
//   template <> struct std::hash<uid> { std::size_t operator()(const uid& u) const noexcept {
//     return std::hash<std::string>{}(u.value); } };
//   static_assert(sluice::hashable_key<uid>);
#pragma once

#include <concepts>
#include <cstddef>
#include <functional>
#include <type_traits>

namespace sluice {

namespace detail {
/// std::equal_to<Key>::operator() is declared for every Key (its body fails later, deep inside a
/// hash table), so for that default the concept asks for `a == b` itself.
template <class Key, class KeyEqual>
concept usable_key_equal =
    !std::is_same_v<KeyEqual, std::equal_to<Key>> || requires(const Key& a, const Key& b) {
      { a == b } -> std::convertible_to<bool>;
    };
}  // namespace detail

/// A key a sluice component can hash, compare and copy. See the file comment.
template <class Key, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
concept hashable_key =
    std::copy_constructible<Key> && std::destructible<Key> && std::copy_constructible<Hash> &&
    std::copy_constructible<KeyEqual> && detail::usable_key_equal<Key, KeyEqual> &&
    requires(const Key& a, const Key& b, const Hash& hash, const KeyEqual& eq) {
      { hash(a) } -> std::convertible_to<std::size_t>;
      { eq(a, b) } -> std::convertible_to<bool>;
    };

namespace detail {

/// Stand-ins a keyed component uses when hashable_key fails, so that its static_assert is the only
/// error the compiler reports. Never used by a program that compiles.
template <class Key>
struct unusable_hash {
  std::size_t operator()(const Key&) const noexcept { return 0; }
};
template <class Key>
struct unusable_key_equal {
  bool operator()(const Key&, const Key&) const noexcept { return false; }
};

/// Hash if hashable_key<Key, Hash, KeyEqual> holds, else the stand-in.
template <class Key, class Hash, class KeyEqual>
using checked_hash = std::conditional_t<hashable_key<Key, Hash, KeyEqual>, Hash, unusable_hash<Key>>;

/// KeyEqual if hashable_key<Key, Hash, KeyEqual> holds, else the stand-in.
template <class Key, class Hash, class KeyEqual>
using checked_key_equal = std::conditional_t<hashable_key<Key, Hash, KeyEqual>, KeyEqual, unusable_key_equal<Key>>;

}  // namespace detail
}  // namespace sluice
