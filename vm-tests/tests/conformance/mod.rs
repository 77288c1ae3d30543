pub mod case;
pub mod run;
pub mod serve;
pub mod table;
